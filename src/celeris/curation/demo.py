"""Demo section: curate the standard-library corpus live, then show the shipped benchmark's
validation-loss-vs-FLOPs curves (raw vs curated vs curated+augmented). No training here."""

from __future__ import annotations

import json
import time
from pathlib import Path

ARTIFACT = Path(__file__).resolve().parent.parent / "artifacts" / "curation" / "bench_data.json"
QUICK_PREFIXES = ("encodings/", "json/", "email/", "test/test_dataclasses/")


def demo_section(ctx) -> None:
    from celeris.corpora import Corpus, load_corpus
    from celeris.curation.bench import loss_vs_flops_plot, summary_rows
    from celeris.curation.pipeline import curate

    ctx.report.section("Data-centric training: curation and the compute it saves")
    corpus = load_corpus("python-stdlib")
    if ctx.quick:
        corpus = Corpus("python-stdlib (subset)", [d for d in corpus.documents if d.id.startswith(QUICK_PREFIXES)])
    t0 = time.perf_counter()
    s = curate(corpus, ctx.out_dir / "curated-stdlib", tokenizer=None, report=True)
    wall = time.perf_counter() - t0
    ctx.report.text(
        f"`celeris curate` on {s['corpus']}: {s['documents_in']:,} documents in, {s['documents_out']:,} out; "
        f"{s['tokens_in']:,} {s['token_unit']} in, {s['tokens_out']:,} out; rules ran at "
        f"{s['documents_per_second']:.0f} documents/s ({wall:.1f} s with token counting and writing). "
        f"Every removal is in {ctx.out_dir / 'curated-stdlib' / 'audit.jsonl'} with its rule and, for duplicates, the kept twin.")
    ctx.report.table([{"rule": k, "removed": v} for k, v in s["removed"].items() if v])
    audit = [json.loads(x) for x in (ctx.out_dir / "curated-stdlib" / "audit.jsonl").read_text().splitlines()]
    dups = [a for a in audit if a["kept_twin"]][:6]
    if dups:
        ctx.report.table([{"removed": a["id"], "rule": a["rule"], "kept twin": a["kept_twin"], "why": a["detail"]} for a in dups])
    print(f"curation: {s['documents_in']} -> {s['documents_out']} documents, removed {s['removed']} "
          f"({s['documents_per_second']:.0f} documents/s)")
    summary = {"curation": {k: s[k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out", "removed",
                                               "documents_per_second")}}
    if ARTIFACT.is_file():
        bench = json.loads(ARTIFACT.read_text())
        ctx.report.text("From the shipped `celeris bench data` results (same model size, tokenizer, decontaminated "
                        "validation set and FLOPs budget for every run; command in docs/curation.md):")
        for spec, r in bench["corpora"].items():
            ctx.report.image(loss_vs_flops_plot(r, f"{spec}: validation loss vs training FLOPs"), f"{spec} loss vs FLOPs")
        rows = summary_rows(bench)
        ctx.report.table(rows)
        summary["bench"] = rows
    else:
        ctx.report.text(f"No shipped benchmark results at {ARTIFACT}; run `celeris bench data --json` to make them.")
    ctx.summary["curation"] = summary
