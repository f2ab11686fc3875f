"""`celeris curate` and `celeris bench data`."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click

from celeris.curation.pipeline import RULES
from celeris.errors import CelerisError
from celeris.validate import FiniteFloatRange


def _rules(value: str | None) -> tuple[str, ...] | None:
    if not value or value == "all":
        return None
    return tuple(r.strip() for r in value.split(",") if r.strip())


@click.command("curate")
@click.argument("corpus")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Output directory (corpus.jsonl, summary.json, audit.jsonl); never the input.")
@click.option("--rules", default="all", show_default=True, help=f"Comma-separated rules: {', '.join(RULES)}.")
@click.option("--eval", "eval_corpus", default=None,
              help="Evaluation text to decontaminate against (any corpus spec: file, directory, .jsonl, ...).")
@click.option("--threshold", default=0.8, show_default=True, type=FiniteFloatRange(),
              help="Near-duplicate Jaccard threshold, in (0, 1).")
@click.option("--num-perm", default=128, show_default=True, type=int, help="MinHash permutations.")
@click.option("--ngram", default=13, show_default=True, type=int, help="Decontamination n-gram size (words).")
@click.option("--min-matches", default=1, show_default=True, type=int,
              help="Shared evaluation n-grams that make a document contaminated.")
@click.option("--tokenizer", default="default", show_default=True,
              help="Count tokens with this model's tokenizer; 'words' counts whitespace words.")
@click.option("--report", is_flag=True, help="Also write DIR/report.html.")
@click.option("--executor", default="inprocess", show_default=True, type=click.Choice(["inprocess", "local", "slurm", "ray"]),
              help="Run on datatrove's executor of this kind (same kept set and audit as in-process).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 4096), help="Processes at once (datatrove).")
@click.option("--tasks", default=None, type=click.IntRange(1, 10**6), help="Shards of the corpus (datatrove; default: --workers).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def curate_cmd(corpus, out, rules, eval_corpus, threshold, num_perm, ngram, min_matches, tokenizer, report, executor,
               workers, tasks, as_json) -> None:
    """Curate CORPUS: exact and near dedup, quality rules, decontamination; audit every removal.

    CORPUS is python-stdlib, package-docs, a file, a directory or a .jsonl. The curated corpus keeps
    document ids, so `celeris.corpora` splits it exactly as the input.
    """
    from celeris.curation.pipeline import CurationConfig, curate
    from celeris.io import check_output_path
    from celeris.validate import emit_json

    check_output_path(out, "dir")
    if executor in ("slurm", "ray"):
        raise CelerisError(f"--executor {executor}: build the same two stages with "
                           "celeris.curation.executors.build_executors (see docs/curation.md); this command runs local only")
    if executor == "inprocess" and (workers != 1 or tasks is not None):
        raise CelerisError("--workers and --tasks need --executor local")
    cfg = CurationConfig(rules=_rules(rules), near_dup_threshold=threshold, num_perm=num_perm, decontam_ngram=ngram,
                         decontam_min_matches=min_matches)
    run = None
    if executor == "local":
        try:
            from celeris.curation.executors import curate_on_executor
        except ImportError as exc:
            raise CelerisError(f"--executor local needs datatrove ({exc}); pip install 'celeris[scale]'") from None
        run = partial(curate_on_executor, workers=workers, tasks=tasks)
    s = curate(corpus, out, cfg, eval_corpus=eval_corpus, tokenizer=None if tokenizer == "words" else tokenizer,
               report=report, executor=run)
    for f in s["skipped_files"]:
        click.echo(f"skipped {f['path']}: {f['reason']}", err=True)
    if as_json:
        emit_json(s)
        return
    click.echo(f"{s['documents_in']:,} documents in, {s['documents_out']:,} out; {s['tokens_in']:,} {s['token_unit']} in, "
               f"{s['tokens_out']:,} out ({s['seconds']:.1f} s, {s['documents_per_second']:.0f} documents/s)")
    for rule, n in s["removed"].items():
        click.echo(f"  {rule:>18}: {n:,}")
    click.echo(f"curated corpus: {out / 'corpus.jsonl'}; audit: {out / 'audit.jsonl'}")


@click.command("data")
@click.option("--corpus", "-c", "corpora", multiple=True,
              help="Corpus to benchmark (repeatable; default: python-stdlib and package-docs).")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the full results here.")
@click.option("--report", "report_out", default=None, type=click.Path(path_type=Path), help="Write an HTML report here.")
@click.option("--size", default="tiny", show_default=True, help="Model size for raw/curated runs.")
@click.option("--budget-steps", default=300, show_default=True, type=click.IntRange(2, 10**7),
              help="FLOPs budget: this many steps of the model (same for every run).")
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--eval-batches", default=8, show_default=True, type=click.IntRange(1, 10**6),
              help="Validation batches (of 16 blocks) per evaluation.")
@click.option("--patience", default=2, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--augment/--no-augment", default=True, show_default=True, help="Also run curated + augmented.")
@click.option("--transfer/--no-transfer", default=True, show_default=True,
              help="Also run LoRA on the default model vs scratch (slow on CPU).")
@click.option("--transfer-steps", default=24, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--seed", default=0, show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Timed curation runs of each corpus after the first; documents/s is their median with min-max.")
def bench_data_cmd(corpora, json_out, report_out, size, budget_steps, eval_every, eval_batches, patience, augment, transfer,
                   transfer_steps, seed, repeats) -> None:
    """Raw vs curated (vs curated+augmented) data at the same FLOPs budget; early stopping; transfer."""
    from celeris.curation.bench import DataBenchConfig, bench_data, summary_rows, write_bench_report
    from celeris.io import check_output_path, save_results
    from celeris.validate import emit_json

    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    if report_out is not None:
        check_output_path(report_out, "file", "--report")
    cfg = DataBenchConfig(size=size, budget_steps=budget_steps, eval_every=eval_every, eval_batches=eval_batches,
                          patience=patience,
                          augment=augment, transfer=transfer, transfer_steps=transfer_steps,
                          transfer_eval_every=max(1, transfer_steps // 4), seed=seed, repeats=repeats,
                          progress=sys.stderr.isatty())
    res = bench_data(list(corpora) or None, cfg)
    if json_out:
        save_results(json_out, res)
    if report_out:
        write_bench_report(res, report_out)
    rows = summary_rows(res)
    emit_json({"rows": rows, **{f"transfer:{k}": {kk: v["transfer"].get(kk) for kk in
                                                    ("target_loss", "lora_flops_to_target", "scratch_flops_to_target", "factor")}
                                for k, v in res["corpora"].items() if "transfer" in v}})


def register(cli: click.Group) -> None:
    cli.add_command(curate_cmd, "curate")
    cli.commands["bench"].add_command(bench_data_cmd, "data")
