"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention, plus a recent window.

S_i <- S_i + sum_q A[q, i] over every query seen (raw sums, not normalised), kept in the per-token
state so it survives evictions. The newest `recent` fraction of the kept budget is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from celeris.memory.policies.base import MemoryPolicy


@dataclass
class H2O(MemoryPolicy):
    recent: int = 64  # tokens always kept (the recent window)
    name = "h2o"
    needs_attention = True

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        n = keys.shape[1]
        acc = state.get("h2o_acc")
        acc = torch.zeros(keys.shape[:2]) if acc is None else F.pad(acc, (0, n - acc.shape[1]))
        acc = acc + attention.float().sum(dim=1)
        state["h2o_acc"] = acc
        recent = positions >= positions[:, -1:] - self.recent + 1
        return torch.where(recent, torch.full_like(acc, float("inf")), acc)
