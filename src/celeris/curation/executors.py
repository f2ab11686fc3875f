"""`curate` on datatrove's executors: the same rules, sharded over tasks, the same kept set and audit.

Two datatrove stages over a work folder (local disk for `LocalPipelineExecutor`, a shared file
system for `SlurmPipelineExecutor` / `RayPipelineExecutor`):

    input/NNNNN.jsonl   the corpus cut into `tasks` shards (document i in shard i mod tasks), each
                        document with its corpus index
    1. signatures (tasks T, workers W): JsonlReader → one `CelerisRuleFilter` per quality rule
       (removals to quality/) → `CelerisSignatures` (exact hash, datasketch MinHash, the evaluation
       n-grams the document holds) → JsonlWriter(signatures/)
    2. resolve (1 task): `ResolveDuplicates` reads every shard, walks the survivors in corpus order
       through exact dedup, near dedup (MinHash LSH) and decontamination, writes resolved.json

Near dedup keeps `datasketch`'s MinHash (same seed and permutations as the in-process pipeline), not
datatrove's `MinhashDedup*` stages: those hash shingles with other functions and keep one document per
union-find cluster, which changes which documents count as near twins and which twin is kept. With
datasketch's signatures computed in the shards and the greedy walk in corpus order done once, the kept
set and the audit are exactly the in-process pipeline's whatever the number of tasks and workers.
Stage 2 is serial by nature (the first document of a cluster wins), as datatrove's own clustering
stage is one task; it reads signatures, not text, and is the cheap part.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datatrove.data import Document as DTDocument
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from loguru import logger

from celeris.corpora import Document
from celeris.curation.dedup import NearDuplicateIndex, NgramContamination, exact_hash, words
from celeris.curation.pipeline import CurationConfig, CurationResult, Removal
from celeris.curation.rules import CODE_RULES, PROSE_RULES, is_code
from celeris.errors import CelerisError

EXECUTORS = ("local", "slurm", "ray")


class QuietLogs(PipelineStep):
    """First step of a local run: silences datatrove's per-task progress and stats logs in this process
    (each worker is a fresh process); failures still raise in the caller."""

    name = "quiet logs"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        logger.disable("datatrove")
        if data:
            yield from data


class CelerisRuleFilter(BaseFilter):
    """One Celeris quality rule (`celeris.curation.rules`) as a datatrove filter; code rules see code only."""

    name = "celeris rule"

    def __init__(self, rule: str, config: CurationConfig, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.rule, self.thresholds = rule, config.thresholds
        self.name = rule  # datatrove's pipeline listing and stats name each filter by its rule
        self.code = rule in CODE_RULES
        self.fn = CODE_RULES[rule] if self.code else PROSE_RULES[rule]

    def filter(self, doc: DTDocument) -> bool | tuple[bool, str]:
        if is_code(doc.id) != self.code:
            return True
        why = self.fn(doc.text, self.thresholds, doc_id=doc.id) if self.code else self.fn(doc.text, self.thresholds)
        if not why:
            return True
        doc.metadata["detail"] = why
        return False, self.rule


class CelerisSignatures(PipelineStep):
    """What stage 2 needs of a surviving document: its exact-dedup hash, its MinHash hash values and
    the evaluation n-grams it holds (with their counts); the text stays in the shard."""

    name = "celeris signatures"

    def __init__(self, config: CurationConfig, eval_texts: list[str] | None) -> None:
        super().__init__()
        self.config, self.eval_texts = config, eval_texts

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        enabled = self.config.enabled()
        near = NearDuplicateIndex(self.config.near_dup_threshold, self.config.num_perm, self.config.shingle_size) \
            if "near_dedup" in enabled else None
        contam = NgramContamination(self.eval_texts, self.config.decontam_ngram) \
            if "decontamination" in enabled and self.eval_texts is not None else None
        for doc in data:
            with self.track_time():
                if "exact_dedup" in enabled:
                    doc.metadata["exact"] = exact_hash(doc.text)
                if near is not None:
                    doc.metadata["minhash"] = [int(v) for v in near.signature(doc.text).hashvalues]
                if contam is not None and contam.grams:
                    # Python's str hash differs between processes: ship the n-grams themselves.
                    w, n = words(doc.text), contam.n
                    grams = (tuple(w[i : i + n]) for i in range(len(w) - n + 1))
                    doc.metadata["eval_grams"] = dict(Counter(" ".join(g) for g in grams if hash(g) in contam.grams))
            yield doc


def _index_adapter(self, doc: DTDocument) -> dict:
    return {"id": doc.id, "metadata": doc.metadata}


def _removal_adapter(self, doc: DTDocument) -> dict:
    m = doc.metadata
    return {"index": m["index"], "id": doc.id, "rule": m["filter_reason"], "detail": m.get("detail", "")}


def _read_jsonl(folder: Path) -> Iterator[dict]:
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            yield from (json.loads(line) for line in fh if line.strip())


def resolve_duplicates(work: Path, config: CurationConfig) -> dict[str, Any]:
    """Stage 2: exact dedup, near dedup and decontamination over the shards, in corpus order.

    Returns `{"kept": [corpus index], "removals": [[index, Removal fields]], ...}` in the in-process
    pipeline's audit order (quality and dedup removals by index, then decontamination's).
    """
    enabled = config.enabled()
    removals: list[tuple[int, dict]] = [(r.pop("index"), r | {"kept_twin": None}) for r in _read_jsonl(work / "quality")]
    survivors = sorted((r["metadata"]["index"], r) for r in _read_jsonl(work / "signatures"))
    near = NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_size) \
        if "near_dedup" in enabled else None
    seen_exact: dict[str, str] = {}
    kept: list[tuple[int, dict]] = []
    for i, r in survivors:
        doc_id, meta = r["id"], r["metadata"]
        if "exact_dedup" in enabled:
            twin = seen_exact.setdefault(meta["exact"], doc_id)
            if twin != doc_id:
                removals.append((i, asdict(Removal(doc_id, "exact_dedup", twin, "same normalised text"))))
                continue
        if near is not None:
            hit = near.add_signature(doc_id, near.from_hashvalues(meta["minhash"]))
            if hit is not None:
                removals.append((i, asdict(Removal(doc_id, "near_dedup", hit[0],
                                                   f"estimated Jaccard {hit[1]:.2f} >= {config.near_dup_threshold}"))))
                continue
        kept.append((i, r))
    removals.sort(key=lambda x: x[0])
    if any("eval_grams" in r["metadata"] for _, r in survivors):  # as NgramContamination.drop_common + matches
        df = Counter(g for _, r in kept for g in r["metadata"].get("eval_grams", {}))
        common = {g for g, c in df.items() if c > config.decontam_max_doc_freq}
        clean = []
        for i, r in kept:
            m = sum(c for g, c in r["metadata"].get("eval_grams", {}).items() if g not in common)
            if m >= config.decontam_min_matches:
                removals.append((i, asdict(Removal(r["id"], "decontamination", None,
                                                   f"{m} shared {config.decontam_ngram}-grams with evaluation text"))))
            else:
                clean.append((i, r))
        kept = clean
    return {"kept": [i for i, _ in kept], "removals": removals}


class ResolveDuplicates(PipelineStep):
    """Stage 2 as a datatrove step (one task): `resolve_duplicates` into WORK/resolved.json."""

    name = "celeris resolve duplicates"

    def __init__(self, work: str, config: CurationConfig) -> None:
        super().__init__()
        self.work, self.config = work, config

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        out = resolve_duplicates(Path(self.work), self.config)
        (Path(self.work) / "resolved.json").write_text(json.dumps(out))
        return iter(())


def signature_pipeline(work: str, config: CurationConfig, eval_texts: list[str] | None,
                       quiet: bool = False) -> list[PipelineStep]:
    """Stage 1's steps: reader → one filter per enabled quality rule → signatures → writer."""
    enabled = config.enabled()
    quality = JsonlWriter(f"{work}/quality", output_filename="${rank}.jsonl", compression=None, adapter=_removal_adapter)
    rules = [r for r in (*PROSE_RULES, *CODE_RULES) if r in enabled]
    return [
        *([QuietLogs()] if quiet else []),
        JsonlReader(f"{work}/input", compression=None),
        *[CelerisRuleFilter(r, config, exclusion_writer=quality) for r in rules],
        CelerisSignatures(config, eval_texts),
        JsonlWriter(f"{work}/signatures", output_filename="${rank}.jsonl", compression=None, adapter=_index_adapter),
    ]


def build_executors(kind: str, work: str, config: CurationConfig, eval_texts: list[str] | None, tasks: int,
                    workers: int, executor_options: dict[str, Any] | None = None, quiet: bool = False) -> tuple[Any, Any]:
    """The two stages handed to one of datatrove's executors: `(signatures, resolve)`; `resolve` depends on
    `signatures`, so running it runs both. `executor_options` go to the executor (Slurm: partition,
    time, ...; Ray: cpus_per_task, ...), e.g. from a JSON config file."""
    opts = dict(executor_options or {})
    stage1 = signature_pipeline(work, config, eval_texts, quiet)
    stage2 = [*([QuietLogs()] if quiet else []), ResolveDuplicates(work, config)]
    logs = f"{work}/logs"
    if kind == "local":
        first = LocalPipelineExecutor(stage1, tasks=tasks, workers=workers, logging_dir=f"{logs}/signatures", **opts)
        return first, LocalPipelineExecutor(stage2, tasks=1, logging_dir=f"{logs}/resolve", depends=first)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        opts.setdefault("time", "1:00:00")
        opts.setdefault("partition", "cpu")
        first = SlurmPipelineExecutor(pipeline=stage1, tasks=tasks, workers=workers, job_name="celeris-signatures",
                                      logging_dir=f"{logs}/signatures", **opts)
        return first, SlurmPipelineExecutor(pipeline=stage2, tasks=1, job_name="celeris-resolve",
                                            logging_dir=f"{logs}/resolve", depends=first, **opts)
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        first = RayPipelineExecutor(pipeline=stage1, tasks=tasks, workers=workers, logging_dir=f"{logs}/signatures", **opts)
        return first, RayPipelineExecutor(pipeline=stage2, tasks=1, logging_dir=f"{logs}/resolve", depends=first, **opts)
    raise CelerisError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def write_shards(documents: list[Document], folder: Path, tasks: int) -> None:
    """The corpus as `tasks` JSONL shards, document i in shard i mod tasks (with its corpus index)."""
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"{r:05d}.jsonl", "w", encoding="utf-8") for r in range(tasks)]
    try:
        for i, d in enumerate(documents):
            rec = {"id": d.id, "text": d.text, "metadata": {"index": i, "source": d.source}}
            handles[i % tasks].write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()


def curate_on_executor(documents: list[Document], config: CurationConfig, eval_texts: list[str] | None = None,
                       workers: int = 1, tasks: int | None = None) -> CurationResult:
    """`curate_documents` run on datatrove's `LocalPipelineExecutor` with `workers` processes."""
    config.validate()
    if workers < 1 or (tasks is not None and tasks < 1):
        raise CelerisError(f"workers and tasks must be >= 1, got {workers} and {tasks}")
    tasks = tasks or workers
    with tempfile.TemporaryDirectory(prefix="celeris-curate-") as tmp:
        work = Path(tmp)
        write_shards(documents, work / "input", tasks)
        t0 = time.perf_counter()
        _, resolve = build_executors("local", str(work), config, eval_texts, tasks, workers, quiet=True)
        logger.disable("datatrove")
        try:
            resolve.run()
        finally:
            logger.enable("datatrove")
        seconds = time.perf_counter() - t0
        resolved = json.loads((work / "resolved.json").read_text())
    removals = [Removal(**r) for _, r in resolved["removals"]]
    return CurationResult([documents[i] for i in resolved["kept"]], removals, len(documents), seconds)
