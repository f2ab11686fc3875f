"""The FLock idea as a Flower strategy: a validator scores every client's update on held-out data.

FLock.io's validators score each proposed model on a private evaluation set (loss, reported as bits
per character: bpc = loss · target_tokens / ln 2 / target_bytes), keep the previous model when the
new one does not beat it, and reward participants by how much they helped. `ValidatedFedAvg` does
that inside Flower's `FedAvg` each round:

1. score each client's returned weights alone on the validation set (loss, bpc);
2. leave-one-out contributions: c_i = L(mean without i) - L(mean of all) (> 0: client i helps);
   while the least helpful client's c_i < -tolerance·L (the aggregate is clearly better without
   it), exclude it and recompute; the surviving clients keep FedAvg's num-examples weights;
3. aggregate with Flower's FedAvg over the survivors; if the aggregate does not beat the current
   global model by `min_gain`, reject the round and keep the previous global model;
4. write the round (per-client loss, bpc, contribution, weight, status) to a JSONL log.

`LoggedStrategy` gives the plain strategies (FedAvg, FedProx, FedAvgM) the same log, the same
architecture check on every update, and the per-round learning rate, without any scoring.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from celeris.errors import CelerisError
from celeris.federated.records import ValidationSet, array_bytes, check_architecture


def weighted_mean(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Σ_i w_i·x_i / Σ_i w_i per tensor, through Flower's own FedAvg aggregation."""
    if not records or len(records) != len(weights) or sum(weights) <= 0:
        raise CelerisError("weighted_mean needs as many positive-sum weights as records")
    contents = [RecordDict({"arrays": r, "metrics": MetricRecord({"weight": float(w)})})
                for r, w in zip(records, weights, strict=True)]
    return aggregate_arrayrecords(contents, "weight")


class Scorer:
    """Validation loss and bits per character of any weights (an `ArrayRecord`) on held-out blocks."""

    def __init__(self, model: torch.nn.Module, val: ValidationSet, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.val = val
        self.batch_size = batch_size
        self.evaluations = 0

    @torch.no_grad()
    def score(self, arrays: ArrayRecord) -> tuple[float, float]:
        """(mean next-token loss in nats, bits per character) of `arrays` on the validation blocks."""
        check_architecture(self.model, arrays, "scored weights")
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        blocks, total = self.val.blocks, 0.0
        for i in range(0, len(blocks), self.batch_size):
            batch = blocks[i : i + self.batch_size]
            total += float(self.model(input_ids=batch, labels=batch).loss) * len(batch)
        self.evaluations += 1
        loss = total / len(blocks)
        if not math.isfinite(loss):
            loss = 1e9  # a diverged update scores as "infinitely bad", not NaN
        return loss, loss * self.val.target_tokens / math.log(2) / self.val.target_bytes

    def loss(self, arrays: ArrayRecord) -> float:
        return self.score(arrays)[0]


class RoundLog:
    """Per-round records (also appended to `path` as JSONL) and the run summary built from them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def start_round(self, server_round: int, **info: Any) -> None:
        self.current = {"round": server_round, **info, "clients": {}, "errors": [], "accepted": True}
        self._t0 = time.perf_counter()

    def client(self, cid: int, **info: Any) -> None:
        self.current["clients"].setdefault(str(cid), {}).update(info)

    def finish_round(self, server_round: int, val_loss: float, val_bpc: float) -> None:
        rec = self.current if self.current.get("round") == server_round else {"round": server_round, "clients": {}}
        rec.update(val_loss=val_loss, val_bpc=val_bpc, seconds=round(time.perf_counter() - self._t0, 3))
        self.rounds.append(rec)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def summary(self, spec, init_loss: float, init_bpc: float, seconds: float) -> dict[str, Any]:
        """The JSON of `celeris federate simulate`. A client's weight is its share of the applied
        aggregate, averaged over accepted rounds (0 in a round it failed, was excluded or rejected)."""
        accepted = [r for r in self.rounds if r.get("accepted", True)]
        weights = {str(c): (sum(r["clients"].get(str(c), {}).get("weight", 0.0) for r in accepted) / len(accepted)
                            if accepted else 0.0) for c in range(spec.clients)}
        last = self.rounds[-1] if self.rounds else {}
        return {
            "final_val_loss": last.get("val_loss", init_loss), "final_val_bpc": last.get("val_bpc", init_bpc),
            "initial_val_loss": init_loss, "initial_val_bpc": init_bpc,
            "rounds": self.rounds, "client_weights": weights, "poisoned": sorted(spec.poison),
            "strategy": spec.strategy, "partition": spec.partition, "clients": spec.clients,
            "rejected_rounds": [r["round"] for r in self.rounds if not r.get("accepted", True)],
            "bytes_per_round": (sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in self.rounds)
                                / max(1, len(self.rounds))),
            "seconds": seconds,
        }


class LoggedStrategy:
    """Mixin over a Flower strategy: per-round lr in the config, architecture check on every update,
    round log with each client's FedAvg weight. Subclasses refine `weigh` and `accept`."""

    def __init__(self, *args: Any, scorer: Scorer, round_log: RoundLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.round_log = round_log
        self.global_arrays: ArrayRecord | None = None
        self.lr_for_round = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = arrays
        if self.lr_for_round is not None:
            config["lr"] = float(self.lr_for_round(server_round))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_log.start_round(server_round, lr=config.get("lr"), sent_to=len(messages),
                                   bytes_down=array_bytes(arrays) * len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        log = self.round_log
        for m in replies:
            if m.has_error():  # a crashed or dropped client: the round goes on without it
                log.current["errors"].append(m.error.reason)
        log.current["bytes_up"] = sum(array_bytes(m.content["arrays"]) for m in valid if "arrays" in m.content)
        kept: list[Message] = []
        for m in valid:
            cid = int(m.content["metrics"].get("client-id", m.metadata.src_node_id))
            try:
                check_architecture(self.scorer.model, m.content["arrays"], f"client {cid}'s update")
            except CelerisError as exc:
                log.client(cid, status="rejected", reason=str(exc), weight=0.0)
                continue
            kept.append(m)
        weights = self.weigh(server_round, kept)
        total = sum(weights.values())
        for m in kept:
            cid = _cid(m)
            w = weights.get(cid, 0.0)
            log.client(cid, weight=w / total if total > 0 else 0.0, num_examples=float(m.content["metrics"]["num-examples"]),
                       train_loss=float(m.content["metrics"].get("train-loss", float("nan"))),
                       status=log.current["clients"].get(str(cid), {}).get("status", "aggregated" if w > 0 else "excluded"))
            m.content["metrics"][self.weighted_by_key] = float(w)
        survivors = [m for m in kept if weights.get(_cid(m), 0.0) > 0]
        if not survivors:
            log.current["accepted"] = False
            return None, None
        arrays, metrics = super().aggregate_train(server_round, survivors)
        return self.accept(server_round, arrays), metrics

    def weigh(self, server_round: int, kept: list[Message]) -> dict[int, float]:
        """Aggregation weight per client id (FedAvg: its number of examples)."""
        return {_cid(m): float(m.content["metrics"]["num-examples"]) for m in kept}

    def accept(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        return arrays


def _cid(m: Message) -> int:
    return int(m.content["metrics"].get("client-id", m.metadata.src_node_id))


class ValidatedFedAvg(LoggedStrategy, FedAvg):
    """FedAvg whose validator scores, excludes harmful updates (leave-one-out) and rejects regressions."""

    def __init__(self, *args: Any, min_gain: float = 0.0, tolerance: float = 0.005, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_gain = min_gain
        self.tolerance = tolerance
        self.base_loss: float | None = None

    def weigh(self, server_round: int, kept: list[Message]) -> dict[int, float]:
        log = self.round_log
        self.base_loss = self.scorer.loss(self.global_arrays) if self.global_arrays is not None else None
        log.current["global_val_loss_before"] = self.base_loss
        arrays = {_cid(m): m.content["arrays"] for m in kept}
        n = {_cid(m): float(m.content["metrics"]["num-examples"]) for m in kept}
        for cid, a in arrays.items():
            loss, bpc = self.scorer.score(a)
            log.client(cid, val_loss=loss, val_bpc=bpc)
        contributions = leave_one_out(self.scorer, arrays, n)
        for cid, c in contributions.items():
            log.client(cid, contribution=c)
        survivors = set(arrays)
        while len(survivors) > 1:
            loo = contributions if survivors == set(arrays) else leave_one_out(
                self.scorer, {c: arrays[c] for c in survivors}, n)
            worst = min(loo, key=lambda c: (loo[c], c))
            # Relative tolerance: between honest clients, LOO deltas are noise of ~0.1% of the loss.
            if loo[worst] >= -self.tolerance * (self.base_loss or 1.0):
                break
            survivors.discard(worst)  # the aggregate is better without this client
            log.client(worst, status="excluded", excluded_with_contribution=loo[worst])
        return {c: (n[c] if c in survivors else 0.0) for c in arrays}

    def accept(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        if arrays is None or self.base_loss is None:
            return arrays
        new_loss = self.scorer.loss(arrays)
        self.round_log.current["candidate_val_loss"] = new_loss
        if new_loss > self.base_loss - self.min_gain:  # FLock: keep the previous model unless it improves
            self.round_log.current["accepted"] = False
            return self.global_arrays
        return arrays


def leave_one_out(scorer: Scorer, arrays: dict[int, ArrayRecord], n: dict[int, float]) -> dict[int, float]:
    """c_i = L(weighted mean without i) - L(weighted mean of all): how much worse the aggregate is
    without client i (> 0: i helps). With fewer than two clients there is nothing to leave out: 0."""
    ids = sorted(arrays)
    if len(ids) < 2:
        return dict.fromkeys(ids, 0.0)
    full = scorer.loss(weighted_mean([arrays[c] for c in ids], [n[c] for c in ids]))
    out = {}
    for c in ids:
        rest = [o for o in ids if o != c]
        out[c] = scorer.loss(weighted_mean([arrays[o] for o in rest], [n[o] for o in rest])) - full
    return out
