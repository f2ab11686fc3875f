"""`celeris bench data`: what curation, augmentation, early stopping and transfer buy, in FLOPs.

For each corpus, side by side in one run, with the same model size, the same tokenizer (BPE trained on
the *raw* training split, so it does not favour the curated data), the same validation set and the
same training-FLOPs budget (`TrainConfig.max_flops`, with the cosine schedule spanning it):

    raw              the training split as it is
    curated          the training split after `curate_documents` (all rules) and decontamination
                     against the validation set
    curated+aug      curated plus one augmented copy of each document (`augment_documents`)

The validation set is the held-out split (document-level, by id hash) *decontaminated*: held-out
documents that are exact or near (MinHash) duplicates of a training document are dropped, and so are
those the quality rules reject: it measures the text we want a model of. Each model's loss on the
raw held-out split (no filtering) is reported too, at the end.

Reported: FLOPs for each run to reach the raw run's best validation loss, final and best losses,
tokens seen; early stopping replayed on every curve (patience counted in validation checks, as the
`Trainer` does; one curated run really is early-stopped by the `Trainer` to check the replay); and
transfer (LoRA on the default pretrained model, `celeris.curation.transfer`) vs training from scratch
to a target loss. All training goes through `celeris.trainer.Trainer`.

Speed: the curation of each corpus's training split is timed `repeats` more times (default 5) after the run
whose output is used; `documents_per_second` and `curation_seconds` are `{"median", "min", "max", "runs"}`.
Training wall times (`seconds` of a run, of a corpus) are one run's cost, not repeated measurements.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from celeris.compute import training_flops_per_token
from celeris.corpora import Document
from celeris.curation.augment import augment_documents
from celeris.curation.corpora import resolve_corpus
from celeris.curation.dedup import NgramContamination, exact_hash
from celeris.curation.pipeline import CurationConfig, curate_documents, is_contaminated
from celeris.curation.rules import quality_verdict
from celeris.curation.transfer import flops_to_reach
from celeris.errors import CelerisError
from celeris.report import REPEATS, check_repeats, environment, spread
from celeris.trainer import TrainConfig, Trainer, causal_lm_loss

DEFAULT_CORPORA = ("python-stdlib", "package-docs")


@dataclass
class DataBenchConfig:
    """Sizes and budgets of `bench data` (defaults fit a shared 2-core CPU: a few minutes per corpus)."""

    size: str = "tiny"
    seq_len: int = 128
    batch_size: int = 16
    vocab_size: int = 4096
    budget_steps: int = 300  # the FLOPs budget is this many steps of the raw run
    eval_every: int = 20
    eval_batches: int = 8
    lr: float = 2e-3
    warmup_steps: int = 20
    patience: int = 2
    min_delta: float = 0.0
    augment: bool = True
    transfer: bool = True
    transfer_steps: int = 24
    transfer_eval_every: int = 4
    seed: int = 0
    near_dup_threshold: float = 0.8
    repeats: int = REPEATS  # timed curation runs after the one whose output is used
    progress: bool = True


@dataclass
class Split:
    """Training/validation documents of one corpus variant."""

    train: list[Document]
    val: list[Document]
    raw_val: list[Document]
    curation: dict[str, Any] = field(default_factory=dict)


def _shuffled(docs: list[Document], seed: int) -> list[Document]:
    """A deterministic shuffle by (seed, id) hash: independent of the input order."""
    return sorted(docs, key=lambda d: hashlib.sha1(f"{seed}:{d.id}".encode()).digest())


def prepare_splits(corpus_spec: str, cfg: DataBenchConfig) -> tuple[list[Document], Split]:
    """Raw training docs, and the curated training docs with the decontaminated validation set."""
    corpus = resolve_corpus(corpus_spec)
    train_raw, val_raw = corpus.split("train").documents, corpus.split("validation").documents
    if not val_raw:
        raise CelerisError(f"corpus {corpus_spec} is too small to hold out validation documents")
    ccfg = CurationConfig(near_dup_threshold=cfg.near_dup_threshold)
    res = curate_documents(train_raw, _training_rules(cfg))
    # Validation: held-out docs that pass the quality rules and have no exact/near twin in training.
    val, val_dropped = [], {"quality": 0, "exact_twin_in_train": 0, "near_twin_in_train": 0}
    for d in val_raw:
        if quality_verdict(d.id, d.text, ccfg.enabled(), ccfg.thresholds) is not None:
            val_dropped["quality"] += 1
        elif exact_hash(d.text) in res.exact_hashes:
            val_dropped["exact_twin_in_train"] += 1
        elif res.near_index is not None and res.near_index.query(d.text) is not None:
            val_dropped["near_twin_in_train"] += 1
        else:
            val.append(d)
    if not val:
        raise CelerisError(f"no validation documents of {corpus_spec} survive decontamination")
    contam = NgramContamination([d.text for d in val], ccfg.decontam_ngram)
    contam.drop_common((d.text for d in res.kept), ccfg.decontam_max_doc_freq)
    kept, decontaminated = [], 0
    for d in res.kept:
        if is_contaminated(d, contam, ccfg.decontam_min_matches):
            decontaminated += 1
        else:
            kept.append(d)
    removed = res.removed | {"decontamination": decontaminated}
    info = {"corpus": corpus.name, "documents": len(corpus), "characters": corpus.characters,
            "train_documents_raw": len(train_raw), "train_characters_raw": sum(len(d.text) for d in train_raw),
            "train_documents_curated": len(kept), "train_characters_curated": sum(len(d.text) for d in kept),
            "removed": removed, "curation_seconds": res.seconds, "documents_per_second": res.documents_per_second,
            "validation_documents_raw": len(val_raw), "validation_documents": len(val), "validation_dropped": val_dropped}
    return train_raw, Split(kept, val, val_raw, info)


def _training_rules(cfg: DataBenchConfig) -> CurationConfig:
    """Every rule but decontamination (the validation set is decontaminated against the training split after)."""
    ccfg = CurationConfig(near_dup_threshold=cfg.near_dup_threshold)
    return CurationConfig(rules=tuple(r for r in ccfg.enabled() if r != "decontamination"),
                          near_dup_threshold=cfg.near_dup_threshold)


def curation_speed(train_raw: list[Document], cfg: DataBenchConfig) -> dict[str, Any]:
    """`curate_documents` of the raw training split `cfg.repeats` times (call it after a first run, the warm-up):
    documents/s and seconds as spreads."""
    check_repeats(cfg.repeats)
    secs = [curate_documents(train_raw, _training_rules(cfg)).seconds for _ in range(cfg.repeats)]
    return {"documents_per_second": spread([len(train_raw) / s for s in secs]), "curation_seconds": spread(secs)}


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss of `model` on token blocks `[n, seq]`."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i : i + batch_size]
        total += float(causal_lm_loss(model, b)) * len(b)
        n += len(b)
    model.train()
    return total / max(1, n)


def replay_early_stopping(history: list[dict[str, Any]], patience: int, min_delta: float = 0.0) -> dict[str, Any]:
    """Where the `Trainer`'s early stopping (patience in validation checks) would have stopped this curve.

    Valid because a run's batches and learning rates are a pure function of (seed, step): an
    early-stopped run is the same run cut short.
    """
    best, bad = math.inf, 0
    points = [h for h in history if h.get("step", 0) > 0]
    for i, h in enumerate(points):
        if h["val_loss"] < best - min_delta:
            best, bad = h["val_loss"], 0
        else:
            bad += 1
        if bad >= patience:
            return {"stopped": True, "stop_step": h["step"], "stop_flops": h["flops"], "best_val_loss_at_stop": best,
                    "checks_after_best": bad, "index": i}
    last = points[-1] if points else {"step": 0, "flops": 0.0}
    return {"stopped": False, "stop_step": last["step"], "stop_flops": last["flops"], "best_val_loss_at_stop": best,
            "checks_after_best": bad}


def _train_run(name: str, tok, train_docs: list[Document], val_blocks: torch.Tensor, raw_val_blocks: torch.Tensor,
               cfg: DataBenchConfig, budget_flops: float, max_steps: int, run_dir: Path,
               patience: int | None = None) -> dict[str, Any]:
    from celeris.lm import token_blocks
    from celeris.models import new_model

    max_tokens = int(max_steps * cfg.batch_size * cfg.seq_len * 1.05) + cfg.seq_len
    train = token_blocks([d.text for d in _shuffled(train_docs, cfg.seed)], tok, cfg.seq_len, max_tokens)
    torch.manual_seed(cfg.seed)
    net = new_model(cfg.size, vocab_size=len(tok), max_position_embeddings=max(cfg.seq_len, 256), seed=cfg.seed)
    fpt = training_flops_per_token(net, cfg.seq_len)
    tcfg = TrainConfig(max_steps=max_steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       eval_every=cfg.eval_every, eval_batches=cfg.eval_batches, max_flops=budget_flops,
                       patience=patience, min_delta=cfg.min_delta, seed=cfg.seed, progress=cfg.progress,
                       save_every=10**9, desc=name)
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(net, train, val_blocks, run_dir, tcfg, flops_per_token=fpt, export_fn=None)
    start = {"step": 0, "tokens": 0, "flops": 0.0, "val_loss": trainer.evaluate()}
    t0 = time.perf_counter()
    res = trainer.train(resume=False).raise_if_interrupted()
    wall = time.perf_counter() - t0
    history = [start] + [{k: h[k] for k in ("step", "tokens", "flops", "val_loss")} for h in res.history]
    raw_loss = mean_loss(trainer.accelerator.unwrap_model(trainer.model), raw_val_blocks, cfg.batch_size)
    return {"name": name, "train_blocks": len(train), "unique_train_tokens": int(train.numel()),
            "epochs": res.tokens / max(1, train.numel()), "steps": res.steps, "stop_reason": res.stop_reason,
            "tokens": res.tokens, "flops": res.flops, "best_val_loss": res.best_val_loss, "best_step": res.best_step,
            "final_val_loss": res.final_val_loss, "raw_heldout_loss_of_best": raw_loss, "seconds": wall,
            "flops_per_token": fpt.to_dict(), "history": history}


def bench_corpus(spec: str, cfg: DataBenchConfig, work_dir: Path) -> dict[str, Any]:
    """All runs for one corpus; returns the JSON-ready results."""
    from celeris.lm import token_blocks, train_tokenizer
    from celeris.models import new_model

    t0 = time.perf_counter()
    train_raw, split = prepare_splits(spec, cfg)  # its curation run is the warm-up of the timed ones
    split.curation.update(curation_speed(train_raw, cfg))
    tok = train_tokenizer([d.text for d in _shuffled(train_raw, cfg.seed)], cfg.vocab_size)
    n_val = cfg.eval_batches * cfg.batch_size
    val_blocks = _spread(token_blocks([d.text for d in _shuffled(split.val, cfg.seed)], tok, cfg.seq_len), n_val)
    raw_val_blocks = _spread(token_blocks([d.text for d in _shuffled(split.raw_val, cfg.seed)], tok, cfg.seq_len), n_val)
    if len(val_blocks) == 0:
        raise CelerisError(f"the validation set of {spec} is shorter than one block of {cfg.seq_len} tokens")
    probe = training_flops_per_token(new_model(cfg.size, vocab_size=len(tok), seed=cfg.seed), cfg.seq_len)
    budget = probe.total * cfg.budget_steps * cfg.batch_size * cfg.seq_len
    variants = {"raw": train_raw, "curated": split.train}
    if cfg.augment:
        variants["curated+aug"] = augment_documents(_budget_sample(split.train, cfg), seed=cfg.seed)
    runs = {}
    for name, docs in variants.items():
        runs[name] = _train_run(f"{Path(spec).name}:{name}", tok, docs, val_blocks, raw_val_blocks, cfg, budget,
                                cfg.budget_steps, work_dir / name)
    target = runs["raw"]["best_val_loss"]
    raw_flops = flops_to_reach(runs["raw"]["history"], target)
    comparison = {}
    for name, r in runs.items():
        f = flops_to_reach(r["history"], target)
        comparison[name] = {"flops_to_raw_best": f, "fraction_of_raw": f / raw_flops if f is not None and raw_flops else None,
                            "flops_saved_vs_raw": 1 - f / raw_flops if f is not None and raw_flops else None}
    early = {}
    for name, r in runs.items():
        rep = replay_early_stopping(r["history"], cfg.patience, cfg.min_delta)
        rep["flops_saved"] = r["flops"] - rep["stop_flops"]
        rep["flops_saved_fraction"] = rep["flops_saved"] / r["flops"] if r["flops"] else 0.0
        rep["loss_given_up"] = rep["best_val_loss_at_stop"] - r["best_val_loss"]
        early[name] = rep
    if early["curated"]["stopped"]:
        # A real early-stopped run through the Trainer checks the replay (when the replay predicts no
        # stop, that run would be the full run again, so it is not repeated).
        es = _train_run(f"{Path(spec).name}:curated(early stop)", tok, split.train, val_blocks, raw_val_blocks, cfg,
                        budget, cfg.budget_steps, work_dir / "curated-es", patience=cfg.patience)
        early["trainer_check"] = {"stop_reason": es["stop_reason"], "steps": es["steps"], "flops": es["flops"],
                                  "best_val_loss": es["best_val_loss"], "best_step": es["best_step"],
                                  "replay_stop_step": early["curated"]["stop_step"],
                                  "matches_replay": es["steps"] == early["curated"]["stop_step"]}
    out = {"corpus": spec, "data": split.curation, "budget_flops": budget, "target_loss": target,
           "tokenizer": {"kind": "BPE trained on the raw training split", "vocab_size": len(tok)},
           "validation_blocks": len(val_blocks), "raw_heldout_blocks": len(raw_val_blocks),
           "runs": runs, "comparison": comparison, "early_stopping": early}
    if cfg.transfer:
        from celeris.curation.transfer import transfer_vs_scratch

        out["transfer"] = transfer_vs_scratch(split.train, split.val, work_dir / "transfer", steps=cfg.transfer_steps,
                                              eval_every=cfg.transfer_eval_every, seed=cfg.seed, progress=cfg.progress)
    out["seconds"] = time.perf_counter() - t0
    return out


def _spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """`n` evenly spaced blocks, so a few long documents do not make up the whole validation set."""
    if len(blocks) <= n:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, n).long()]


def _budget_sample(docs: list[Document], cfg: DataBenchConfig) -> list[Document]:
    """Enough documents (in the run's shuffled order) to fill the budget twice: augmenting the whole
    corpus would cost minutes for copies the budget never reaches."""
    need = cfg.budget_steps * cfg.batch_size * cfg.seq_len * 4 * 2  # ~4 characters per token, twice over
    out, chars = [], 0
    for d in _shuffled(docs, cfg.seed):
        if chars >= need:
            break
        out.append(d)
        chars += len(d.text)
    return out


def bench_data(corpora: list[str] | None = None, config: DataBenchConfig | None = None,
               work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `bench_corpus` for each corpus (default: python-stdlib and package-docs)."""
    cfg = config or DataBenchConfig()
    check_repeats(cfg.repeats)
    torch.set_num_threads(1)
    tmp = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="celeris-bench-data-"))
    try:
        results = {"environment": environment(), "config": asdict(cfg), "torch_threads": torch.get_num_threads(),
                   "timing": "documents_per_second, curation_seconds: median (min, max) of config.repeats runs after "
                             "the first; every other seconds figure is one run's wall time", "corpora": {}}
        for spec in corpora or list(DEFAULT_CORPORA):
            results["corpora"][spec] = bench_corpus(spec, cfg, tmp / Path(spec).name)
        return results
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per (corpus, run)."""
    rows = []
    for spec, r in results["corpora"].items():
        for name, run in r["runs"].items():
            c, e = r["comparison"][name], r["early_stopping"][name]
            rows.append({"corpus": spec, "run": name, "tokens": run["tokens"], "FLOPs": run["flops"],
                         "best val": run["best_val_loss"], "final val": run["final_val_loss"],
                         "raw held-out": run["raw_heldout_loss_of_best"],
                         "FLOPs to raw best": c["flops_to_raw_best"],
                         "saved vs raw": c["flops_saved_vs_raw"],
                         "ES stop step": e["stop_step"], "ES FLOPs saved": e["flops_saved_fraction"],
                         "ES loss given up": e["loss_given_up"]})
    return rows


def loss_vs_flops_plot(result: dict[str, Any], title: str) -> str:
    """Validation loss vs training FLOPs, one line per run (base64 PNG)."""
    from celeris.report import line_plot

    series = {name: ([h["flops"] for h in run["history"][1:]], [h["val_loss"] for h in run["history"][1:]])
              for name, run in result["runs"].items()}
    return line_plot(series, "training FLOPs", "validation loss (nats/token)", title)


def write_bench_report(results: dict[str, Any], path: str | Path) -> Path:
    """An HTML report: per corpus the curation summary, loss-vs-FLOPs curves and the comparison table."""
    from celeris.report import Report, format_spread, line_plot

    rep = Report("Celeris: data-centric training benchmark")
    for spec, r in results["corpora"].items():
        rep.section(f"{spec}")
        d = r["data"]
        rep.table([{**{k: d[k] for k in ("documents", "train_documents_raw", "train_documents_curated", "train_characters_raw",
                                          "train_characters_curated", "validation_documents")},
                    "documents/s, median (min-max)": format_spread(d["documents_per_second"], 0)}])
        rep.table([{"rule": k, "removed": v} for k, v in d["removed"].items()])
        rep.image(loss_vs_flops_plot(r, f"{spec}: same model, tokenizer, validation set and FLOPs budget"),
                  "validation loss vs FLOPs")
        rep.table([row for row in summary_rows(results) if row["corpus"] == spec])
        if "transfer" in r:
            t = r["transfer"]
            rep.text(f"Transfer: LoRA on SmolLM2-135M vs a {t['scratch']['name']} model from scratch with the same "
                     f"FLOPs; target loss {t['target_loss']:.3f}; FLOPs to target: LoRA {t['lora_flops_to_target']}, "
                     f"scratch {t['scratch_flops_to_target']}.")
            series = {k: ([h["flops"] for h in t[k]["history"]], [h["val_loss"] for h in t[k]["history"]])
                      for k in ("lora", "scratch")}
            rep.image(line_plot(series, "training FLOPs", "validation loss", f"{spec}: transfer vs scratch"),
                      "transfer vs scratch")
    return rep.write(path)
