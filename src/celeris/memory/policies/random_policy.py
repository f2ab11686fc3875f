"""Random eviction: the floor every informed policy must beat (seeded per sample)."""

from __future__ import annotations

import torch

from celeris.memory.policies.base import MemoryPolicy


class RandomPolicy(MemoryPolicy):
    name = "random"

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def reset(self, seed: int = 0) -> None:
        self.generator.manual_seed(seed)

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        return torch.rand(keys.shape[:2], generator=self.generator)
