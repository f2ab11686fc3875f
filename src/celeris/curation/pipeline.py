"""`curate`: run the rules over a corpus and write the curated corpus, its summary and its audit.

Stages, in order (a document leaves at the first stage that removes it):
    quality rules (prose: Gopher/C4; code: generated, vendored, tiny, long lines, data tables,
    alphabetic ratio) → exact_dedup → near_dedup (MinHash LSH) → decontamination (n-gram overlap)
Quality rules run first so that a duplicate's `kept_twin` is a document that passed them.

Output directory:
    corpus.jsonl    kept documents `{"id", "text", "source"}` (ids unchanged, so splits are stable;
                    `celeris.corpora.load_corpus(DIR/corpus.jsonl)` reads it)
    summary.json    {"documents_in", "documents_out", "tokens_in", "tokens_out", "removed": {rule: n}, ...}
    audit.jsonl     one `{"id", "rule", "kept_twin", "detail"}` per removed document
    report.html     (with `report=True`) the summary, a bar plot of removals and examples
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celeris.corpora import Corpus, Document
from celeris.curation.corpora import resolve_corpus
from celeris.curation.dedup import NearDuplicateIndex, NgramContamination, check_threshold, exact_hash
from celeris.curation.rules import CODE_RULES, PROSE_RULES, QualityThresholds, quality_verdict
from celeris.errors import CelerisError
from celeris.io import atomic_dir, atomic_write_text, write_json

RULES: tuple[str, ...] = (*PROSE_RULES, *CODE_RULES, "exact_dedup", "near_dedup", "decontamination")


@dataclass
class CurationConfig:
    """Which rules run and their knobs. `rules=None` runs all of them."""

    rules: tuple[str, ...] | None = None
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 5
    decontam_ngram: int = 13
    decontam_min_matches: int = 1
    decontam_max_doc_freq: int = 5
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)

    def enabled(self) -> set[str]:
        chosen = set(RULES if self.rules is None else self.rules)
        unknown = chosen - set(RULES)
        if unknown:
            raise CelerisError(f"unknown rule(s) {', '.join(sorted(unknown))}; choose from {', '.join(RULES)}")
        return chosen

    def validate(self) -> None:
        self.enabled()
        check_threshold(self.near_dup_threshold)
        if self.num_perm < 16:
            raise CelerisError(f"num_perm must be >= 16, got {self.num_perm}")
        if self.decontam_ngram < 1:
            raise CelerisError(f"decontam_ngram (--ngram) must be >= 1, got {self.decontam_ngram}")
        if self.decontam_min_matches < 1:
            raise CelerisError(f"decontam_min_matches must be >= 1, got {self.decontam_min_matches}")


@dataclass
class Removal:
    id: str
    rule: str
    kept_twin: str | None = None
    detail: str = ""


@dataclass
class CurationResult:
    """Kept documents, one `Removal` per removed document, and timing."""

    kept: list[Document]
    removals: list[Removal]
    documents_in: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    exact_hashes: dict[str, str] = field(default_factory=dict, repr=False)  # normalised hash -> first id
    near_index: NearDuplicateIndex | None = field(default=None, repr=False)  # MinHash LSH of the kept documents

    @property
    def removed(self) -> dict[str, int]:
        return dict(Counter(r.rule for r in self.removals))

    @property
    def documents_per_second(self) -> float:
        return self.documents_in / self.seconds if self.seconds > 0 else 0.0


def curate_documents(documents: Iterable[Document], config: CurationConfig | None = None,
                     eval_texts: Iterable[str] | None = None) -> CurationResult:
    """Apply the enabled rules to `documents` (in order; the first of each duplicate set is kept)."""
    config = config or CurationConfig()
    config.validate()
    enabled = config.enabled()
    docs = list(documents)
    removals: list[Removal] = []
    seen_exact: dict[str, str] = {}
    near = NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_size) \
        if "near_dedup" in enabled else None
    contam = NgramContamination(eval_texts, config.decontam_ngram) \
        if "decontamination" in enabled and eval_texts is not None else None
    kept: list[Document] = []
    t0 = time.perf_counter()  # after the index is built: importing datasketch is not curation time
    for d in docs:
        verdict = quality_verdict(d.id, d.text, enabled, config.thresholds)
        if verdict is not None:
            removals.append(Removal(d.id, verdict[0], None, verdict[1]))
            continue
        if "exact_dedup" in enabled:
            h = exact_hash(d.text)
            if h in seen_exact:
                removals.append(Removal(d.id, "exact_dedup", seen_exact[h], "same normalised text"))
                continue
            seen_exact[h] = d.id
        if near is not None:
            hit = near.add(d.id, d.text)
            if hit is not None:
                removals.append(Removal(d.id, "near_dedup", hit[0], f"estimated Jaccard {hit[1]:.2f} >= {config.near_dup_threshold}"))
                continue
        kept.append(d)
    if contam is not None:  # a second pass: it needs the document frequencies of the survivors
        contam.drop_common((d.text for d in kept), config.decontam_max_doc_freq)
        survivors = []
        for d in kept:
            if r := is_contaminated(d, contam, config.decontam_min_matches):
                removals.append(r)
            else:
                survivors.append(d)
        kept = survivors
    return CurationResult(kept, removals, len(docs), time.perf_counter() - t0, exact_hashes=seen_exact, near_index=near)


def is_contaminated(doc: Document, contam: NgramContamination, min_matches: int = 1) -> Removal | None:
    """A `decontamination` removal when `doc` shares at least `min_matches` n-grams with the evaluation text."""
    m = contam.matches(doc.text)
    if m >= min_matches:
        return Removal(doc.id, "decontamination", None, f"{m} shared {contam.n}-grams with evaluation text")
    return None


def count_tokens(texts: list[str], tokenizer=None) -> list[int]:
    """Tokens of each text by `tokenizer` (a Hugging Face tokenizer), or whitespace words when it is None."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    counts: list[int] = []
    for i in range(0, len(texts), 256):
        counts.extend(len(e) for e in tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"])
    return counts


def _input_paths(spec: str) -> list[Path]:
    if not spec.strip():  # an in-memory Corpus: no path to protect (Path("") would be the cwd)
        return []
    p = Path(spec).expanduser()
    return [p.resolve()] if p.exists() else []


def check_out_dir(out: Path, spec: str) -> None:
    """`curate` replaces `out` as a whole, so it must neither be nor contain nor lie inside the input."""
    o = out.expanduser().resolve()
    for inp in _input_paths(spec):
        if o == inp or inp.is_relative_to(o) or o.is_relative_to(inp):
            raise CelerisError(f"--out {out} overlaps the input corpus {spec}; curate never overwrites its input")
    if o.is_file():
        raise CelerisError(f"--out {out} is a file; it must be a directory")
    if o.is_dir() and any(o.iterdir()) and not (o / "summary.json").is_file():
        raise CelerisError(f"--out {out} exists and is not a curation output; choose another directory")


def load_curation_inputs(corpus: str | Corpus, out_dir: str | Path, config: CurationConfig | None = None,
                         eval_corpus: str | Corpus | None = None) -> tuple[CurationConfig, Corpus, Corpus | None]:
    """What `curate` checks and reads before any work: the config, the corpus and the evaluation text."""
    config = config or CurationConfig()
    config.validate()
    out = Path(out_dir)
    check_out_dir(out, corpus if isinstance(corpus, str) else "")
    if isinstance(eval_corpus, str):
        check_out_dir(out, eval_corpus)
    data = resolve_corpus(corpus)
    if not data.documents:
        raise CelerisError(f"corpus {data.name} has no documents")
    return config, data, resolve_corpus(eval_corpus) if eval_corpus is not None else None


def curate(corpus: str | Corpus, out_dir: str | Path, config: CurationConfig | None = None,
           eval_corpus: str | Corpus | None = None, tokenizer: Any = "default", report: bool = False,
           executor: Callable[..., CurationResult] | None = None) -> dict[str, Any]:
    """Curate a corpus (a `load_corpus` spec or a `Corpus`) into `out_dir`; returns the summary.

    `executor(documents, config, eval_texts)` replaces the in-process `curate_documents` (e.g.
    `celeris.curation.executors.curate_on_executor` with its workers bound: the same result on datatrove).

    `eval_corpus` (a spec or `Corpus`) is the evaluation text to decontaminate against; without it
    the decontamination rule has nothing to match and removes nothing. `tokenizer`: "default" (the
    default model's), a tokenizer object, a model name/path, or None to count whitespace words.
    """
    config, data, evals = load_curation_inputs(corpus, out_dir, config, eval_corpus)
    res = (executor or curate_documents)(data.documents, config, evals.texts() if evals is not None else None)
    return write_curation(out_dir, data, res, config, evals.name if evals is not None else None, tokenizer, report)


def write_curation(out_dir: str | Path, data: Corpus, res: CurationResult, config: CurationConfig,
                   decontaminated_against: str | None, tokenizer: Any = "default", report: bool = False) -> dict[str, Any]:
    """Write `res` (kept documents: objects of `data.documents`) as `curate`'s output directory; returns the summary."""
    out = Path(out_dir)
    res.skipped = list(data.skipped)
    tok = tokenizer
    if isinstance(tokenizer, str):
        from celeris.models import load_tokenizer

        tok = load_tokenizer(None if tokenizer == "default" else tokenizer)
    t0 = time.perf_counter()
    per_doc = dict(zip((id(d) for d in data.documents), count_tokens(data.texts(), tok), strict=True))
    tokens_in = sum(per_doc.values())
    tokens_out = sum(per_doc[id(d)] for d in res.kept)  # kept holds the same Document objects
    token_seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "corpus": data.name,
        "documents_in": res.documents_in,
        "documents_out": len(res.kept),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "token_unit": "words" if tok is None else "tokens",
        "removed": {r: res.removed.get(r, 0) for r in RULES if r in config.enabled()},
        "skipped_files": [{"path": p, "reason": why} for p, why in res.skipped],
        "decontaminated_against": decontaminated_against,
        "seconds": round(res.seconds, 3),
        "documents_per_second": round(res.documents_per_second, 1),
        "token_count_seconds": round(token_seconds, 3),
        "config": {k: v for k, v in asdict(config).items() if k != "thresholds"} | {"rules": sorted(config.enabled())},
    }
    with atomic_dir(out) as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for d in res.kept:
                fh.write(json.dumps({"id": d.id, "text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
        with open(tmp / "audit.jsonl", "w", encoding="utf-8") as fh:
            for r in res.removals:
                fh.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
        write_json(tmp / "summary.json", summary)
        if report:
            atomic_write_text(tmp / "report.html", "")
            _write_report(tmp / "report.html", summary, res, data)
    return summary


def _write_report(path: Path, summary: dict[str, Any], res: CurationResult, data: Corpus) -> None:
    from celeris.report import Report, bar_plot

    rep = Report(f"Curation of {summary['corpus']}")
    rep.section("Summary")
    rep.table([{k: summary[k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out", "seconds",
                                         "documents_per_second")}])
    removed = {k: v for k, v in summary["removed"].items() if v}
    if removed:
        rep.image(bar_plot(removed, "documents removed", "removals by rule"), "removals by rule")
    rep.table([{"rule": k, "removed": v} for k, v in summary["removed"].items()])
    rep.section("Examples (first 5 removals per rule)")
    by_rule: dict[str, list[Removal]] = {}
    for r in res.removals:
        by_rule.setdefault(r.rule, []).append(r)
    rep.table([{"rule": r.rule, "id": r.id, "kept_twin": r.kept_twin, "detail": r.detail}
               for rs in by_rule.values() for r in rs[:5]])
    if summary["skipped_files"]:
        rep.section("Skipped files (unreadable or not UTF-8)")
        rep.table(summary["skipped_files"])
    rep.write(path)
