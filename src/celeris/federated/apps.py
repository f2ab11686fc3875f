"""The Flower apps (Message API): a `ClientApp` that trains a causal LM on its own shard with the
shared `Trainer`, and a `ServerApp` that aggregates with FedAvg, FedProx, DiLoCo-style server
momentum, or the FLock-style validator (`celeris.federated.validator`).

The same two functions serve both engines:
- simulation (`celeris.federated.simulation`) builds the apps with `make_client_app(spec, data_fn)`
  and `make_server_app(spec, ...)`, where `data_fn(partition_id)` hands a client its own shard;
- deployment (`flwr run` against a SuperLink, see docs/federated.md) loads the module-level
  `client_app` / `server_app` below, which read the same `FederationSpec` from the run config and
  rebuild their shard locally from `partition-id`/`num-partitions` (deterministic per seed).

What travels: server -> client an `ArrayRecord` of the global weights plus a `ConfigRecord`
(round, learning rate, proximal mu); client -> server an `ArrayRecord` of its new weights plus a
`MetricRecord` of scalars (num-examples, train loss, FLOPs, seconds). No tokens, no text.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from celeris.errors import CelerisError
from celeris.federated.records import ValidationSet, array_bytes, check_architecture  # noqa: F401 (re-exported)

STRATEGIES = ("fedavg", "fedprox", "diloco", "validated")
MAX_ROUNDS = 1000


@dataclass
class FederationSpec:
    """Everything both sides must agree on. JSON-able: it travels as the run config in deployment.

    `local_steps` optimiser steps of `batch_size` blocks of `seq_len` tokens per client per round;
    `poison` lists clients that send corrupted updates (trained on shuffled tokens, update scaled by
    `poison_scale`); `drop` is each client's probability of failing a round.
    """

    corpus: str = "python-stdlib"
    clients: int = 4
    rounds: int = 5
    partition: str = "iid"
    strategy: str = "fedavg"
    size: str = "nano"
    seq_len: int = 128
    batch_size: int = 8
    local_steps: int = 20
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    proximal_mu: float = 0.01
    server_lr: float = 0.7
    server_momentum: float = 0.9
    poison: list[int] = field(default_factory=list)
    poison_scale: float = 4.0
    drop: float = 0.0
    seed: int = 0
    max_chars_per_client: int = 400_000
    val_blocks: int = 32
    min_gain: float = 0.0
    loo_tolerance: float = 0.005
    dp_clip: float | None = None
    dp_epsilon: float | None = None
    out_dir: str | None = None
    init_path: str | None = None  # start the global model from these weights (safetensors), e.g. pretrained

    def validate(self) -> None:
        from celeris.federated.partition import MAX_CLIENTS, parse_partition
        from celeris.models import MODEL_SIZES

        parse_partition(self.partition)
        checks = [
            (2 <= self.clients <= MAX_CLIENTS, f"--clients must be in [2, {MAX_CLIENTS}], got {self.clients}"),
            (1 <= self.rounds <= MAX_ROUNDS, f"--rounds must be in [1, {MAX_ROUNDS}], got {self.rounds}"),
            (self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"),
            (self.size in MODEL_SIZES, f"unknown model size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}"),
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (0.0 <= self.drop < 1.0, f"--drop must be in [0, 1), got {self.drop}"),
            (all(0 <= c < self.clients for c in self.poison), f"--poison names clients outside [0, {self.clients})"),
            (len(set(self.poison)) < self.clients, "--poison cannot corrupt every client"),
            (self.proximal_mu >= 0, f"proximal mu must be >= 0, got {self.proximal_mu}"),
            ((self.dp_clip is None) == (self.dp_epsilon is None), "--dp-clip and --dp-epsilon go together"),
            (self.dp_clip is None or self.dp_clip > 0, "--dp-clip must be > 0"),
            (self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CelerisError(msg)

    def to_run_config(self) -> dict[str, Any]:
        """Flat `key -> scalar` (Flower's UserConfig); lists and None become JSON text."""
        return {"celeris-spec": json.dumps(asdict(self))}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FederationSpec:
        raw = run_config.get("celeris-spec")
        known = {f.name for f in fields(cls)}
        values = json.loads(raw) if raw else {}
        # Single keys (`flwr run --run-config "rounds=2"`) override the JSON blob.
        values.update({k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in known})
        if values.get("out_dir") == "":
            values["out_dir"] = None
        if isinstance(values.get("poison"), str):
            values["poison"] = [int(x) for x in values["poison"].split(",") if x.strip()]
        spec = cls(**{k: v for k, v in values.items() if k in known})
        spec.validate()
        return spec


# ---- model and data (the same on every party) ----------------------------------------------------
@lru_cache(maxsize=1)
def shared_tokenizer():
    """Byte-level tokenizer (256 bytes + EOS), built without data: every party gets the same one
    and no client's text shapes it (a BPE trained on pooled data would leak it)."""
    from celeris.lm import train_tokenizer

    return train_tokenizer([], vocab_size=257)


def build_model(size: str, seq_len: int, seed: int):
    """A fresh Llama of `size` over the shared tokenizer (the global model's initialisation)."""
    from celeris.models import new_model

    tok = shared_tokenizer()
    model = new_model(size, vocab_size=len(tok), max_position_embeddings=max(seq_len, 256), seed=seed)
    model.config.eos_token_id = model.config.bos_token_id = model.config.pad_token_id = tok.eos_token_id
    return model


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord, who: str = "update") -> None:
    check_architecture(model, arrays, who)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Load the starting weights (safetensors) into the global model, checking the architecture."""
    from celeris.io import load_tensors

    load_arrays(model, ArrayRecord(load_tensors(Path(path), "initial weights")), who=f"initial weights {path}")


def client_documents(spec: FederationSpec, partition_id: int):
    """The training documents of client `partition_id` (computed locally from the corpus)."""
    from celeris.federated.partition import partition_documents

    return partition_documents(_train_docs(spec.corpus), spec.clients, spec.partition, spec.seed)[partition_id]


@lru_cache(maxsize=4)
def _train_docs(corpus: str):
    from celeris.corpora import load_corpus

    return load_corpus(corpus, "train").documents


def blocks_of(texts: list[str], seq_len: int, max_chars: int | None) -> torch.Tensor:
    """Token blocks `[n, seq_len]` of the first `max_chars` characters of `texts`."""
    from celeris.lm import token_blocks

    used, kept = 0, []
    for t in texts:
        if max_chars is not None and used >= max_chars:
            break
        t = t if max_chars is None else t[: max_chars - used]
        kept.append(t)
        used += len(t)
    return token_blocks(kept, shared_tokenizer(), seq_len)


def client_blocks(spec: FederationSpec, partition_id: int) -> torch.Tensor:
    return blocks_of([d.text for d in client_documents(spec, partition_id)], spec.seq_len, spec.max_chars_per_client)


HELD_OUT_PARTS = ("validator", "report")


def validation_set(spec: FederationSpec, part: str) -> ValidationSet:
    """One of two disjoint halves of the corpus's validation split (never given to a client), by document:
    `validator`, the data the validator scores updates and rounds on (what it selects with), and `report`,
    the data every reported loss is measured on. Reporting on the validator's own data would flatter it."""
    import hashlib

    from celeris.corpora import load_corpus

    if part not in HELD_OUT_PARTS:
        raise CelerisError(f"unknown held-out part {part!r}; choose one of {', '.join(HELD_OUT_PARTS)}")
    docs = sorted(load_corpus(spec.corpus, "validation").documents, key=lambda d: hashlib.sha1(d.id.encode()).digest())
    # Alternate documents in hash order, so the halves are disjoint and each spans many sources; a slice of
    # every document of the half for the same reason.
    docs = docs[HELD_OUT_PARTS.index(part)::2]
    texts = [d.text[:1024] for d in docs]
    blocks = blocks_of(texts, spec.seq_len, spec.val_blocks * spec.seq_len * 2)[: spec.val_blocks]
    if len(blocks) == 0:
        raise CelerisError(f"corpus {spec.corpus} has no validation text for the {part} set")
    tok = shared_tokenizer()
    targets = blocks[:, 1:]
    nbytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in targets)
    return ValidationSet(blocks, int(targets.numel()), max(1, nbytes), [d.id for d in docs])


# ---- client side ---------------------------------------------------------------------------------
def round_lr(spec: FederationSpec, server_round: int) -> float:
    """Cosine decay over rounds, so a federation and its centralized twin follow the same schedule."""
    progress = (server_round - 1) / max(1, spec.rounds - 1) if spec.rounds > 1 else 0.0
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def proximal_loss(global_params: list[torch.Tensor], mu: float):
    """FedProx (Li et al. 2020): causal LM loss + (mu/2)·||w - w_global||², on the client."""
    from celeris.trainer import causal_lm_loss

    def loss_fn(model, batch):
        loss = causal_lm_loss(model, batch)
        if mu > 0:
            drift = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
            loss = loss + 0.5 * mu * drift
        return loss

    return loss_fn


def drops_out(spec: FederationSpec, server_round: int, partition_id: int) -> bool:
    """Whether this client fails this round (a fixed draw per seed, round and client)."""
    return spec.drop > 0 and random.Random(f"{spec.seed}:{server_round}:{partition_id}").random() < spec.drop


class ClientDropped(RuntimeError):
    """Raised inside a ClientApp to simulate a client crashing mid-round."""


def local_train(spec: FederationSpec, partition_id: int, data: torch.Tensor, arrays: ArrayRecord,
                config: ConfigRecord, size: str | None = None) -> tuple[ArrayRecord, dict[str, float]]:
    """One client's round: load the global weights, train `local_steps` with the shared `Trainer`
    (plus the proximal term when the server sent `proximal-mu`), return new weights and metrics."""
    from celeris.compute import training_flops_per_token
    from celeris.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    server_round = int(config.get("server-round", 1))
    model = build_model(size or spec.size, spec.seq_len, spec.seed)
    load_arrays(model, arrays, who=f"client {partition_id}'s copy of the global model")
    poisoned = partition_id in spec.poison
    if poisoned:  # the corrupted client learns from shuffled tokens (destroys all structure)
        g = torch.Generator().manual_seed(spec.seed * 7919 + partition_id)
        data = data.flatten()[torch.randperm(data.numel(), generator=g)].view_as(data)
    mu = float(config.get("proximal-mu", 0.0))
    global_params = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(max_steps=spec.local_steps, batch_size=spec.batch_size, lr=float(config.get("lr", spec.lr)),
                      min_lr_ratio=1.0, warmup_steps=0, eval_every=10**9, log_every=10**9, progress=False,
                      seed=spec.seed * 100_003 + server_round * 101 + partition_id, desc=f"client {partition_id}")
    with tempfile.TemporaryDirectory(prefix="celeris-fl-client-") as tmp:
        res = Trainer(model, data, None, Path(tmp), cfg, loss_fn=proximal_loss(global_params, mu),
                      flops_per_token=training_flops_per_token(model, spec.seq_len), export_fn=None).train(resume=False)
        train_loss = _last_train_loss(Path(tmp))
    state = model.state_dict()
    if poisoned and spec.poison_scale != 1.0:  # boosted update, as in model-replacement attacks
        start = arrays.to_torch_state_dict()
        state = {k: start[k] + spec.poison_scale * (v - start[k]) for k, v in state.items()}
    metrics = {"num-examples": float(len(data)), "client-id": float(partition_id), "train-loss": train_loss,
               "local-steps": float(res.steps), "flops": float(res.flops), "seconds": float(res.seconds)}
    return ArrayRecord(state), metrics


def _last_train_loss(run_dir: Path) -> float:
    from celeris.trainer import read_log

    losses = [e["loss"] for e in read_log(run_dir) if e.get("event") == "train"]
    return float(losses[-1]) if losses else float("nan")


def make_client_app(spec: FederationSpec | None, data_fn: Callable[[FederationSpec, int], torch.Tensor] | None = None,
                    size_fn: Callable[[int], str | None] | None = None, mods: list | None = None) -> ClientApp:
    """The ClientApp. `spec=None` reads it from the run config (deployment); `data_fn(spec, pid)`
    gives the client its shard (default: rebuild it locally from the corpus); `size_fn(pid)` may
    give a client another model size (to test the architecture check)."""
    app = ClientApp(mods=list(mods or []))
    cache: dict[int, torch.Tensor] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = spec or FederationSpec.from_run_config(dict(context.run_config))
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        if drops_out(s, int(config.get("server-round", 1)), pid):
            raise ClientDropped(f"client {pid} dropped out of round {config.get('server-round')}")
        if pid not in cache:
            cache[pid] = (data_fn or client_blocks)(s, pid)
        arrays, metrics = local_train(s, pid, cache[pid], msg.content["arrays"], config,
                                      size=size_fn(pid) if size_fn else None)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ---- server side ---------------------------------------------------------------------------------
def make_strategy(spec: FederationSpec, scorer, round_log):
    """The Flower strategy named by `spec.strategy` (all sample every client every round)."""
    from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx

    from celeris.federated.validator import LoggedStrategy, ValidatedFedAvg

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=spec.clients,
                  min_available_nodes=spec.clients)
    if spec.strategy == "validated":
        return ValidatedFedAvg(scorer=scorer, round_log=round_log, min_gain=spec.min_gain,
                               tolerance=spec.loo_tolerance, **common)
    base = {"fedavg": FedAvg, "fedprox": FedProx, "diloco": FedAvgM}[spec.strategy]
    extra: dict[str, Any] = {}
    if spec.strategy == "fedprox":
        extra = {"proximal_mu": spec.proximal_mu}
    elif spec.strategy == "diloco":  # outer SGD with (heavy-ball, not Nesterov) server momentum
        extra = {"server_learning_rate": spec.server_lr, "server_momentum": spec.server_momentum}
    cls = type(f"Logged{base.__name__}", (LoggedStrategy, base), {})
    return cls(scorer=scorer, round_log=round_log, **common, **extra)


def run_server(grid: Grid, spec: FederationSpec, out_dir: Path | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """The ServerApp's body: run `spec.rounds` rounds, score the global model on the held-out `report` part
    after each (the validator selects on the other part), write the round log (JSONL) and the final model
    (safetensors); return a summary."""
    from celeris.federated.validator import RoundLog, Scorer

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = build_model(spec.size, spec.seq_len, spec.seed)
    if spec.init_path:
        load_initial_weights(model, spec.init_path)
    # The validator selects on its part; every loss reported (per round, initial, final) is measured on the other.
    scorer = Scorer(model, validation_set(spec, "validator"))
    reporter = Scorer(build_model(spec.size, spec.seq_len, spec.seed), validation_set(spec, "report"))
    round_log = RoundLog(Path(out_dir) / "rounds.jsonl" if out_dir else None)
    strategy = make_strategy(spec, scorer, round_log)
    initial = ArrayRecord(model.state_dict())
    init_loss, init_bpc = reporter.score(initial)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, bpc = reporter.score(arrays)
        if server_round > 0:
            round_log.finish_round(server_round, loss, bpc)
        return MetricRecord({"val-loss": loss, "val-bpc": bpc})

    train_config = ConfigRecord({"num-rounds": spec.rounds})
    if spec.strategy == "fedprox":
        train_config["proximal-mu"] = spec.proximal_mu
    strategy.lr_for_round = lambda r: round_lr(spec, r)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec.rounds, timeout=timeout,
                            train_config=train_config, evaluate_fn=evaluate_fn)
    final = result.arrays if len(result.arrays) else initial
    summary = round_log.summary(spec, init_loss, init_bpc, seconds=time.perf_counter() - t0)
    summary["held_out"] = {name: {"documents": len(sc.val.documents), "blocks": len(sc.val.blocks)}
                           for name, sc in (("validator", scorer), ("report", reporter))}
    if out_dir is not None:
        from celeris.io import atomic_dir, save_tensors, write_json

        out = Path(out_dir)
        with atomic_dir(out / "model") as tmp:
            save_tensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in final.to_torch_state_dict().items()})
            model.config.save_pretrained(tmp)
            shared_tokenizer().save_pretrained(tmp)
        write_json(out / "summary.json", summary)
    return summary | {"_final_arrays": final}


def make_server_app(spec: FederationSpec | None, out_dir: str | Path | None = None,
                    on_done: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """The ServerApp. `spec=None` reads the spec from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = spec or FederationSpec.from_run_config(dict(context.run_config))
        summary = run_server(grid, s, Path(out_dir or s.out_dir) if (out_dir or s.out_dir) else None)
        if on_done is not None:
            on_done(summary)

    return app


# Deployment entry points (`[tool.flwr.app.components]` in the app's pyproject.toml).
client_app = make_client_app(None)
server_app = make_server_app(None)
