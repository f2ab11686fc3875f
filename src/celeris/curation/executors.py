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
    celeris.json        what `collect_curation` needs besides resolved.json to write `curate`'s output
                        (corpus name, skipped files, config, tokenizer, submission time)

`curate_on_datatrove` runs `curate` this way (local and Ray: to the end; Slurm: it submits both stages
with sbatch and returns, and `collect_curation` writes the output once the jobs have finished).

Near dedup keeps `datasketch`'s MinHash (same seed and permutations as the in-process pipeline), not
datatrove's `MinhashDedup*` stages: those hash shingles with other functions and keep one document per
union-find cluster, which changes which documents count as near twins and which twin is kept. With
datasketch's signatures computed in the shards and the greedy walk in corpus order done once, the kept
set and the audit are exactly the in-process pipeline's whatever the number of tasks and workers.
Stage 2 is serial by nature (the first document of a cluster wins), as datatrove's own clustering
stage is one task; it reads signatures, not text, and is the cheap part.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datatrove.data import Document as DTDocument
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from loguru import logger

from celeris.corpora import Corpus, Document
from celeris.curation.dedup import NearDuplicateIndex, NgramContamination, exact_hash, words
from celeris.curation.pipeline import (
    CurationConfig,
    CurationResult,
    Removal,
    check_out_dir,
    load_curation_inputs,
    write_curation,
)
from celeris.curation.rules import CODE_RULES, PROSE_RULES, QualityThresholds, is_code
from celeris.errors import CelerisError

EXECUTORS = ("local", "slurm", "ray")
EXECUTOR_CLASSES = {"local": LocalPipelineExecutor, "slurm": SlurmPipelineExecutor, "ray": RayPipelineExecutor}
# Keyword arguments build_executors sets itself, with where the user sets them instead.
SET_BY_CELERIS = {"pipeline": "the two stages", "tasks": "--tasks", "workers": "--workers", "logging_dir": "--work-dir",
                  "depends": "the two stages", "job_name": "the two stages", "depends_job_id": "the two stages"}
# Given to ray.init (the cluster to join; default: a running one, else a local one), not to RayPipelineExecutor.
RAY_INIT_OPTIONS = {"address": inspect.Parameter("address", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                 annotation="str | None")}
MANIFEST = "celeris.json"


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
        out = resolve_duplicates(Path(self.work), self.config) | {"finished_at": time.time()}
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
        # fork, not datatrove's default forkserver: each worker inherits the imported modules (datatrove,
        # datasketch, the rules) instead of importing them again, about 0.4 s of a 2-worker run on the built-in
        # corpus; the parent has not used any thread pool (tokenizer, torch) before the stages run.
        if "fork" in multiprocessing.get_all_start_methods():
            opts.setdefault("start_method", "fork")
        first = LocalPipelineExecutor(stage1, tasks=tasks, workers=workers, logging_dir=f"{logs}/signatures", **opts)
        return first, LocalPipelineExecutor(stage2, tasks=1, logging_dir=f"{logs}/resolve", depends=first)
    if kind == "slurm":
        opts.setdefault("time", "1:00:00")
        opts.setdefault("partition", "cpu")
        if sys.prefix != sys.base_prefix and not {"env_command", "condaenv", "venv_path"} & opts.keys():
            opts["venv_path"] = f"{sys.prefix}/bin/activate"  # the jobs import Celeris: this virtual env, if shared
        first = SlurmPipelineExecutor(pipeline=stage1, tasks=tasks, workers=workers, job_name="celeris-signatures",
                                      logging_dir=f"{logs}/signatures", **opts)
        return first, SlurmPipelineExecutor(pipeline=stage2, tasks=1, job_name="celeris-resolve",
                                            logging_dir=f"{logs}/resolve", depends=first, **opts)
    if kind == "ray":
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


def check_executor_options(kind: str, options: dict[str, Any], source: str = "executor options") -> dict[str, Any]:
    """`options` checked against the keyword arguments of datatrove's `kind` executor (`inspect.signature`),
    less those Celeris sets itself (plus Ray's `address`, for `ray.init`). A `CelerisError` names the first
    bad key: unknown, set by Celeris, or of a JSON type its annotation does not allow."""
    if kind not in EXECUTOR_CLASSES:
        raise CelerisError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    cls = EXECUTOR_CLASSES[kind]
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    if kind == "ray":
        params |= RAY_INIT_OPTIONS
    accepted = sorted(params.keys() - SET_BY_CELERIS.keys())
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in SET_BY_CELERIS:
            raise CelerisError(f"{source}: {key!r} is set by celeris ({SET_BY_CELERIS[key]}), not by the config")
        if key not in accepted:
            raise CelerisError(f"{source}: unknown key {key!r} for {cls.__name__}; accepted: {', '.join(accepted)}")
        out[key] = _json_option(source, key, value, params[key])
    return out


# JSON value types that fit an annotation's name (the executors' annotations are strings: `from __future__`).
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                            "dict": (dict,), "tuple": (list,), "list": (list,), "None": (type(None),),
                                            "Callable": ()}


def _json_option(source: str, key: str, value: Any, param: inspect.Parameter) -> Any:
    """`value` if its JSON type fits the argument's annotation (`int | None`, `tuple[str] | None`, ...); a
    JSON list becomes a tuple for a tuple argument."""
    names = [t.strip().split("[")[0] for t in str(param.annotation).split("|")]
    if any(n not in _JSON_TYPES for n in names):  # an annotation we cannot read: datatrove checks it
        return value
    fits = [n for n in names if isinstance(value, _JSON_TYPES[n]) and (n == "bool" or not isinstance(value, bool))]
    if not fits:
        raise CelerisError(f"{source}: {key!r} must be {param.annotation}, got {json.dumps(value)}")
    return tuple(value) if fits[0] == "tuple" else value


def read_executor_config(kind: str, path: str | Path) -> dict[str, Any]:
    """The executor's options from a JSON file holding one object (`check_executor_options` checks the keys)."""
    src = f"--executor-config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CelerisError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CelerisError(f"{src}: cannot read it ({exc})") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CelerisError(f"{src}: not valid JSON ({exc})") from None
    if not isinstance(options, dict):
        raise CelerisError(f"{src}: must hold one JSON object of the executor's options, got {type(options).__name__}")
    return check_executor_options(kind, options, src)


def run_stages(kind: str, work: Path, config: CurationConfig, eval_texts: list[str] | None, tasks: int, workers: int,
               executor_options: dict[str, Any] | None = None, quiet: bool = False) -> bool:
    """Run both stages over `work` (local, Ray: returns True, resolved.json is written) or submit them
    (Slurm: datatrove calls sbatch for each; returns False at once)."""
    opts = dict(executor_options or {})
    ray_init = {k: opts.pop(k) for k in RAY_INIT_OPTIONS if k in opts} if kind == "ray" else {}
    with _quiet_datatrove(quiet):
        first, resolve = build_executors(kind, str(work), config, eval_texts, tasks, workers, opts, quiet)
        if kind == "slurm":
            resolve.run()  # sbatch for stage 1, then stage 2 with --dependency=afterok on it
            return False
        if kind == "ray":
            _run_on_ray(first, resolve, ray_init)
        else:
            resolve.run()
    return True


@contextlib.contextmanager
def _quiet_datatrove(quiet: bool) -> Iterator[None]:
    if quiet:
        logger.disable("datatrove")
    try:
        yield
    finally:
        if quiet:
            logger.enable("datatrove")


def _run_on_ray(first: RayPipelineExecutor, resolve: RayPipelineExecutor, ray_init: dict[str, Any]) -> None:
    """Stage 1, then stage 2, on the Ray cluster at `ray_init["address"]` (default: `ray.init()`'s: a running
    cluster, else a local one for this run). A failed stage-1 task is an error here: `RayPipelineExecutor` only
    logs it, and stage 2 would then wait for it forever."""
    import ray  # optional: `pip install 'celeris[ray]'`

    started = not ray.is_initialized()
    if started:
        ray.init(**ray_init)
    try:
        first.run()
        if missing := first.get_incomplete_ranks(skip_completed=True):
            raise CelerisError(f"{len(missing)} of {first.tasks} signature tasks failed on Ray (ranks {missing[:10]}); "
                               f"logs in {first.logging_dir.path}")
        resolve.run()
    finally:
        if started:
            ray.shutdown()


def curate_on_executor(documents: list[Document], config: CurationConfig, eval_texts: list[str] | None = None,
                       workers: int = 1, tasks: int | None = None, kind: str = "local",
                       executor_options: dict[str, Any] | None = None) -> CurationResult:
    """`curate_documents` run on datatrove's `kind` executor ("local": `workers` processes; "ray": `workers`
    tasks at once on Ray) over a temporary work folder."""
    config.validate()
    if kind == "slurm":
        raise CelerisError("curate_on_executor waits for the result; on Slurm: curate_on_datatrove, then collect_curation")
    tasks = _check_tasks(workers, tasks)
    with tempfile.TemporaryDirectory(prefix="celeris-curate-") as tmp:
        work = Path(tmp)
        write_shards(documents, work / "input", tasks)
        t0 = time.perf_counter()
        run_stages(kind, work, config, eval_texts, tasks, workers, executor_options, quiet=True)
        seconds = time.perf_counter() - t0
        resolved = json.loads((work / "resolved.json").read_text())
    removals = [Removal(**r) for _, r in resolved["removals"]]
    return CurationResult([documents[i] for i in resolved["kept"]], removals, len(documents), seconds)


def _check_tasks(workers: int, tasks: int | None) -> int:
    if workers < 1 or (tasks is not None and tasks < 1):
        raise CelerisError(f"workers and tasks must be >= 1, got {workers} and {tasks}")
    return tasks or workers


def _check_work_dir(kind: str, work: str | Path | None, out_dir: str | Path, options: dict[str, Any]) -> Path | None:
    """The work folder must be new (an old run's completion marks would make datatrove skip tasks) and apart
    from --out; Slurm and a Ray cluster need one (on a file system every node sees)."""
    if work is None:
        if kind == "slurm" or (kind == "ray" and (options.get("address") or os.environ.get("RAY_ADDRESS"))):
            raise CelerisError(f"--executor {kind} needs --work-dir on a file system every node sees")
        return None
    w, o = Path(work).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if w == o or w.is_relative_to(o) or o.is_relative_to(w):
        raise CelerisError(f"--work-dir {work} overlaps --out {out_dir}; give them separate folders")
    if w.exists() and (not w.is_dir() or any(w.iterdir())):
        raise CelerisError(f"--work-dir {work} exists and is not an empty folder; give a new one for each run")
    return w


def curate_on_datatrove(corpus: str | Corpus, out_dir: str | Path, kind: str = "local", work: str | Path | None = None,
                        config: CurationConfig | None = None, eval_corpus: str | Corpus | None = None,
                        tokenizer: str | None = "default", report: bool = False, tasks: int | None = None,
                        workers: int = 1, executor_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`curate` on datatrove's `kind` executor over the work folder `work` (a temporary one when None; Slurm
    needs one every node sees). Local and Ray: runs both stages and returns the summary, the output exactly
    the in-process run's. Slurm: submits both stages and returns None; once the jobs have finished,
    `collect_curation(work, out_dir)` writes the output. `tokenizer` is a name or None (whitespace words):
    it is recorded in the work folder for `collect_curation`."""
    tasks = _check_tasks(workers, tasks)
    opts = check_executor_options(kind, executor_options or {})
    w = _check_work_dir(kind, work, out_dir, opts)
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise CelerisError("--executor ray needs Ray: pip install 'celeris[ray]'")
    config, data, evals = load_curation_inputs(corpus, out_dir, config, eval_corpus)
    with contextlib.ExitStack() as stack:
        if w is None:
            w = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="celeris-curate-")))
        write_shards(data.documents, w / "input", tasks)
        manifest = {"corpus": data.name, "inputs": [s for s in (corpus, eval_corpus) if isinstance(s, str)],
                    "skipped": data.skipped, "documents": len(data.documents),
                    "decontaminated_against": None if evals is None else evals.name, "config": asdict(config),
                    "tokenizer": tokenizer, "executor": kind, "tasks": tasks, "workers": workers,
                    "submitted_at": time.time()}
        (w / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False))
        eval_texts = None if evals is None else evals.texts()
        if run_stages(kind, w, config, eval_texts, tasks, workers, opts, quiet=kind != "slurm"):
            return collect_curation(w, out_dir, report)
        return None


def _config_from_json(d: dict[str, Any]) -> CurationConfig:
    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    thresholds = QualityThresholds(**{k: tuples(v) for k, v in d["thresholds"].items()})
    return CurationConfig(**{k: tuples(v) for k, v in d.items() if k != "thresholds"}, thresholds=thresholds)


def collect_curation(work: str | Path, out_dir: str | Path, report: bool = False) -> dict[str, Any]:
    """Write `curate`'s output (corpus.jsonl, audit.jsonl, summary.json) from a finished work folder of
    `curate_on_datatrove`; the same bytes as the in-process run but for summary.json's timings (`seconds`
    runs from submission to the end of stage 2, queueing included)."""
    w = Path(work)
    if not (w / MANIFEST).is_file():
        raise CelerisError(f"--work-dir {work} holds no {MANIFEST}: not a work folder of celeris curate --executor")
    manifest = json.loads((w / MANIFEST).read_text(encoding="utf-8"))
    for spec in manifest["inputs"]:
        check_out_dir(Path(out_dir), spec)
    if not (w / "resolved.json").is_file():
        done = len(list((w / "logs" / "signatures" / "completions").glob("*")))
        raise CelerisError(f"--work-dir {work}: not finished ({done} of {manifest['tasks']} signature tasks done, "
                           f"resolve not done); logs in {w / 'logs'}")
    resolved = json.loads((w / "resolved.json").read_text())
    by_index = {r["metadata"]["index"]: Document(r["id"], r["text"], r["metadata"]["source"])
                for r in _read_jsonl(w / "input")}
    documents = [by_index[i] for i in range(manifest["documents"])]
    data = Corpus(manifest["corpus"], documents, [tuple(s) for s in manifest["skipped"]])
    res = CurationResult([documents[i] for i in resolved["kept"]], [Removal(**r) for _, r in resolved["removals"]],
                         len(documents), resolved["finished_at"] - manifest["submitted_at"])
    return write_curation(out_dir, data, res, _config_from_json(manifest["config"]),
                          manifest["decontaminated_against"], manifest["tokenizer"], report)
