"""Full cache: every token scores the same and the runner never evicts (the reference)."""

from __future__ import annotations

import torch

from celeris.memory.policies.base import MemoryPolicy


class FullCache(MemoryPolicy):
    name = "full"
    supports_threshold = True
    keeps_all = True

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        return torch.zeros(keys.shape[:2])  # >= 0 everywhere: threshold mode keeps all
