"""The one training loop every Celeris system uses.

`Trainer` runs on `accelerate` (CPU, one GPU, or `accelerate launch` on many) with AdamW, cosine
schedule with linear warm-up, gradient clipping, validation every N steps, early stopping (patience
counted in validation checks), atomic checkpoints (safetensors + JSON) with exact resume, and compute
accounting (`celeris.compute`) written to a JSONL log.

Data is a tensor (or a dict of tensors sharing the first dimension) of training examples. The
examples of step s are a pure function of (seed, s): a fresh permutation per epoch. That is what makes
a resumed run bit-identical to an uninterrupted one.

Under `accelerate launch --num_processes P` each process takes every P-th example of the same global
batch (so `batch_size` must divide by P) and DDP averages the gradients: the loss curve is the one of a
single process up to float summation order. The logged loss, the token and FLOPs counts and every stop
decision are reduced over the processes, so all of them stop at the same step and the job is counted
once; only the main process writes. A checkpoint holds the whole (replicated) state, so a run resumes
under any process count that divides its batch size.

Output directory layout:
    log.jsonl                 one JSON object per train log / validation / end event
    checkpoint/               latest state: model.safetensors, optimizer.safetensors, state.json
    best.safetensors          weights at the best validation loss
    config.json, model.safetensors, ...   the exported final (best) model, via `export_fn`
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from tqdm.auto import tqdm

from celeris.compute import FlopsPerToken
from celeris.errors import CelerisError
from celeris.io import atomic_dir, atomic_write_text, load_tensors, read_json, save_tensors, write_json

Batch = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. Budgets: `max_steps`, and optionally seconds or FLOPs."""

    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int | None = None  # default: at every validation
    patience: int | None = None  # validation checks without improvement before stopping
    min_delta: float = 0.0
    max_seconds: float | None = None
    max_flops: float | None = None
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    desc: str = "train"

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}"),
            (self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
        ]
        # nan fails every comparison above only by luck of their direction; inf passes them: say so.
        for name in ("lr", "min_lr_ratio", "min_delta", "grad_clip", "weight_decay", "max_seconds", "max_flops"):
            value = getattr(self, name, None)
            if value is not None and not math.isfinite(value):
                raise CelerisError(f"{name} must be a finite number, got {value}")
        for ok, msg in checks:
            if not ok:
                raise CelerisError(msg)

    def lr_at(self, step: int) -> float:
        """Learning rate for (0-based) step: linear warm-up, then cosine down to min_lr_ratio·lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What a run did: where it stopped and why, its losses, and the compute it spent."""

    out_dir: str
    steps: int
    stop_reason: str  # max_steps | early_stopping | max_seconds | max_flops | interrupted
    best_val_loss: float | None
    best_step: int | None
    final_val_loss: float | None
    tokens: int
    flops: float
    flops_dense: float
    flops_attention: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def raise_if_interrupted(self) -> TrainResult:
        """For commands that chain several runs: a SIGINT/SIGTERM that cut this run short stops them too
        (instead of going on to the next run with a half-trained model)."""
        if self.stop_reason == "interrupted":
            raise KeyboardInterrupt(f"interrupted at step {self.steps}; checkpoint in {self.out_dir}")
        return self


def process_state():
    """accelerate's view of this job's processes (one, or those `accelerate launch` started).

    On a machine without CUDA it must be asked for CPU explicitly: otherwise accelerate ignores the
    launcher's WORLD_SIZE and every process believes it is alone.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_batch_split(batch_size: int) -> None:
    """Refuse a global batch that the job's processes cannot share equally (their losses would be
    weighted unequally and the curve would no longer be the one-process curve)."""
    n = process_state().num_processes
    if batch_size % n:
        raise CelerisError(f"batch_size {batch_size} does not split evenly over {n} processes; "
                           "choose a multiple of the process count")


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a batch of token blocks `[batch, seq]`."""
    return model(input_ids=batch, labels=batch).loss


def _num_examples(data: Batch) -> int:
    return len(next(iter(data.values()))) if isinstance(data, dict) else len(data)


def _index(data: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in data.items()} if isinstance(data, dict) else data[idx]


def _to(batch: Batch, device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)


def _default_tokens(batch: Batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.numel())


def _default_export(model, directory: Path) -> None:
    from celeris.models import _quiet_transformers

    _quiet_transformers()
    model.save_pretrained(directory)


class _StopSignal:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for sig, old in self._old.items():  # a second signal behaves as usual
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Train `model` on `train_data` with `loss_fn(model, batch) -> loss`, validating on `val_data`.

    `flops_per_token` gives the compute per processed token (`tokens_fn(batch)` counts them; the
    default counts every element of the batch tensor). `export_fn(model, dir)` writes the final model
    (default: `save_pretrained`); `tokenizer`, if given, is saved next to it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_data: Batch,
        val_data: Batch | None,
        out_dir: str | Path,
        config: TrainConfig,
        loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = causal_lm_loss,
        flops_per_token: FlopsPerToken | None = None,
        tokens_fn: Callable[[Batch], int] = _default_tokens,
        export_fn: Callable[[torch.nn.Module, Path], None] | None = _default_export,
        tokenizer: Any = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator

        config.validate()
        if _num_examples(train_data) == 0:
            raise CelerisError("no training examples: the corpus is too small for the sequence length")
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.train_data = train_data
        self.val_data = val_data if val_data is not None and _num_examples(val_data) > 0 else None
        self.loss_fn = loss_fn
        self.fpt = flops_per_token or FlopsPerToken(0, 0, 0.0, 0.0)
        self.tokens_fn = tokens_fn
        self.export_fn = export_fn
        self.tokenizer = tokenizer
        self.run_info = run_info or {}
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_batch_split(config.batch_size)
        if self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
            # The main process saves its own copy of the weights: right when they are replicated (DDP), a
            # shard under FSDP/DeepSpeed. Refused until checkpoints gather the sharded state.
            raise CelerisError(f"the Trainer does not checkpoint {self.accelerator.distributed_type.name}-sharded models yet; "
                               "launch with plain data parallelism (accelerate launch --multi_gpu)")
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(config.beta1, config.beta2),
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.n_train = _num_examples(train_data)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self.state: dict[str, Any] = {
            "step": 0, "tokens": 0, "flops_dense": 0.0, "flops_attention": 0.0, "seconds": 0.0,
            "best_val_loss": None, "best_step": None, "bad_evals": 0, "last_val_loss": None,
            "stop_reason": None,
        }
        self.history: list[dict[str, Any]] = []

    # ---- data ----------------------------------------------------------------------------------
    def _example_ids(self, step: int) -> torch.Tensor:
        """Indices of the training examples of (0-based) `step`: a pure function of seed and step."""
        b, n = self.cfg.batch_size, self.n_train
        out = []
        for p in range(step * b, step * b + b):
            epoch = p // n
            if epoch != self._perm_epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
            out.append(self._perm[p % n])
        idx = torch.stack(out)
        acc = self.accelerator
        return idx[acc.process_index :: acc.num_processes]

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first `eval_batches` batches of the validation data."""
        if self.val_data is None:
            return None
        self.model.eval()
        n = _num_examples(self.val_data)
        losses, weights = [], []
        for i in range(0, min(n, self.cfg.eval_batches * self.cfg.batch_size), self.cfg.batch_size):
            idx = torch.arange(i, min(n, i + self.cfg.batch_size))
            batch = _to(_index(self.val_data, idx), self.accelerator.device)
            losses.append(float(self.loss_fn(self.model, batch)))
            weights.append(len(idx))
        self.model.train()
        return sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _fingerprint(self) -> dict[str, Any]:
        return {"batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "n_train": self.n_train}

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        opt = self.optimizer.state_dict()
        tensors, groups = {}, []
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for g in opt["param_groups"]:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
        with atomic_dir(self.checkpoint_dir) as tmp:
            st_save_model(model, str(tmp / "model.safetensors"))
            save_tensors(tmp / "optimizer.safetensors", tensors or {"_empty": torch.zeros(0)})
            write_json(tmp / "state.json", {"state": self.state, "param_groups": groups, "fingerprint": self._fingerprint(),
                                            "config": asdict(self.cfg), "history": self.history})

    def _load_checkpoint(self) -> None:
        meta = read_json(self.checkpoint_dir / "state.json", "checkpoint state")
        if meta.get("fingerprint") != self._fingerprint():
            raise CelerisError(
                f"the checkpoint in {self.checkpoint_dir} was written for other data or settings "
                f"({meta.get('fingerprint')} vs {self._fingerprint()}); use another output directory or overwrite"
            )
        model = self.accelerator.unwrap_model(self.model)
        try:
            st_load_model(model, str(self.checkpoint_dir / "model.safetensors"))
        except Exception as exc:
            raise CelerisError(f"checkpoint weights in {self.checkpoint_dir} do not fit this model: {str(exc).splitlines()[0]}") from None
        flat = load_tensors(self.checkpoint_dir / "optimizer.safetensors", "optimizer state")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in flat.items():
            if key == "_empty":
                continue
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.state = meta["state"]
        self.history = meta.get("history", [])
        self._truncate_log(self.state["step"])

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        log = self.out_dir / "log.jsonl"
        if not self.accelerator.is_main_process or not log.is_file():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
                and json.loads(ln).get("event") != "end"]
        atomic_write_text(log, "".join(k + "\n" for k in keep))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- the loop ------------------------------------------------------------------------------
    def _record(self, **extra: Any) -> dict[str, Any]:
        s = self.state
        return {"step": s["step"], "tokens": s["tokens"], "flops": s["flops_dense"] + s["flops_attention"],
                "flops_dense": s["flops_dense"], "flops_attention": s["flops_attention"],
                "seconds": round(s["seconds"], 3), **extra}

    def _validate_and_maybe_stop(self) -> bool:
        val = self.evaluate()
        if val is None:
            return False
        s, cfg = self.state, self.cfg
        s["last_val_loss"] = val
        improved = s["best_val_loss"] is None or val < s["best_val_loss"] - cfg.min_delta
        if improved:
            s["best_val_loss"], s["best_step"], s["bad_evals"] = val, s["step"], 0
            if self.accelerator.is_main_process:
                model = self.accelerator.unwrap_model(self.model)
                tmp = self.out_dir / "best.safetensors.tmp"
                st_save_model(model, str(tmp))
                tmp.replace(self.out_dir / "best.safetensors")
        else:
            s["bad_evals"] += 1
        rec = self._record(event="val", val_loss=val, best_val_loss=s["best_val_loss"], improved=improved)
        self.history.append(rec)
        self._log(rec)
        return cfg.patience is not None and s["bad_evals"] >= cfg.patience

    def train(self, resume: bool = True) -> TrainResult:
        """Run until a budget is spent, early stopping triggers, or SIGINT/SIGTERM; then export."""
        if resume and (self.checkpoint_dir / "state.json").is_file():
            self._load_checkpoint()
        elif (self.out_dir / "log.jsonl").exists() and self.accelerator.is_main_process:
            (self.out_dir / "log.jsonl").unlink()
        self.accelerator.wait_for_everyone()  # no process appends to the log before it is cleaned
        cfg, s = self.cfg, self.state
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if s["step"] == 0:
            self._log(self._record(event="start", n_params=self.fpt.n_params, n_trainable=self.fpt.n_trainable,
                                   flops_per_token=self.fpt.to_dict(), config=asdict(cfg), **self.run_info))
        if s["stop_reason"] in ("early_stopping",) or s["step"] >= cfg.max_steps:
            return self._finish(s["stop_reason"] or "max_steps")
        self.model.train()
        save_every = cfg.save_every or cfg.eval_every
        bar = tqdm(total=cfg.max_steps, initial=s["step"], desc=cfg.desc, disable=not cfg.progress or not self.accelerator.is_main_process,
                   unit="step", dynamic_ncols=True)
        reason = "max_steps"
        window_tokens, window_start, loss_ema = 0, time.perf_counter(), None
        with _StopSignal() as stop:
            while s["step"] < cfg.max_steps:
                t0 = time.perf_counter()
                lr = cfg.lr_at(s["step"])
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                batch = _to(_index(self.train_data, self._example_ids(s["step"])), self.accelerator.device)
                loss = self.loss_fn(self.model, batch)
                # The mean over processes of equal slices is the global batch's loss; every process sees it.
                global_loss = self.accelerator.reduce(loss.detach(), "mean")
                if not torch.isfinite(global_loss):
                    raise CelerisError(f"the training loss became {float(global_loss)} at step {s['step']}; lower the learning rate")
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                ntok = self._global_count(self.tokens_fn(batch))
                s["step"] += 1
                s["tokens"] += ntok
                s["flops_dense"] += self.fpt.dense * ntok
                s["flops_attention"] += self.fpt.attention * ntok
                s["seconds"] += time.perf_counter() - t0
                window_tokens += ntok
                lv = float(global_loss)
                loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
                if s["step"] % cfg.log_every == 0 or s["step"] == 1:
                    dt = time.perf_counter() - window_start
                    self._log(self._record(event="train", loss=lv, lr=lr, tokens_per_second=window_tokens / max(dt, 1e-9)))
                    bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{window_tokens / max(dt, 1e-9):.0f}",
                                    val=f"{s['last_val_loss']:.3f}" if s["last_val_loss"] is not None else "-")
                    window_tokens, window_start = 0, time.perf_counter()
                bar.update()
                if s["step"] % cfg.eval_every == 0 and self._validate_and_maybe_stop():
                    reason = "early_stopping"
                elif self._any_process(cfg.max_seconds is not None and s["seconds"] >= cfg.max_seconds):
                    reason = "max_seconds"
                elif cfg.max_flops is not None and s["flops_dense"] + s["flops_attention"] >= cfg.max_flops:
                    reason = "max_flops"
                elif self._any_process(stop.requested):
                    reason = "interrupted"
                if reason == "interrupted" or (reason == "max_steps" and s["step"] % save_every == 0
                                               and s["step"] < cfg.max_steps):
                    self.save_checkpoint()  # other stops are checkpointed by _finish
                if reason != "max_steps":
                    break
        bar.close()
        if reason == "interrupted":
            self._log(self._record(event="interrupted"))
            return self._result(reason)
        return self._finish(reason)

    def _global_count(self, n: int) -> int:
        """`n` summed over the processes (tokens of the whole global batch, counted once)."""
        if self.accelerator.num_processes == 1:
            return n
        return int(self.accelerator.reduce(torch.tensor(n, device=self.accelerator.device), "sum"))

    def _any_process(self, flag: bool) -> bool:
        """True on every process if it is true on one (clocks and signals differ between processes)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(int(flag), device=self.accelerator.device), "sum"))

    def _finish(self, reason: str) -> TrainResult:
        s = self.state
        if not self.history or self.history[-1]["step"] != s["step"]:
            self._validate_and_maybe_stop()  # a validation at the very end, so the curve has its last point
        s["stop_reason"] = reason
        self.save_checkpoint()
        if self.accelerator.is_main_process and self.export_fn is not None:
            model = self.accelerator.unwrap_model(self.model)
            best = self.out_dir / "best.safetensors"
            if best.is_file():
                st_load_model(model, str(best))
            self.export_fn(model, self.out_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.out_dir)
        self._log(self._record(event="end", stop_reason=reason, best_val_loss=s["best_val_loss"], best_step=s["best_step"]))
        self.accelerator.wait_for_everyone()  # no process returns before the main one has exported
        return self._result(reason)

    def _result(self, reason: str) -> TrainResult:
        s = self.state
        return TrainResult(
            out_dir=str(self.out_dir), steps=s["step"], stop_reason=reason, best_val_loss=s["best_val_loss"],
            best_step=s["best_step"], final_val_loss=s["last_val_loss"], tokens=s["tokens"],
            flops=s["flops_dense"] + s["flops_attention"], flops_dense=s["flops_dense"],
            flops_attention=s["flops_attention"], seconds=s["seconds"], history=list(self.history),
        )


def read_log(out_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run's `log.jsonl`."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        raise CelerisError(f"no training log in {out_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
