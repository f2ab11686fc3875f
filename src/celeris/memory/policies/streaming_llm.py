"""StreamingLLM (Xiao et al. 2023): keep the first `n_sink` tokens ("attention sinks") and the most
recent ones; the budget sets the size of the recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from celeris.memory.policies.base import MemoryPolicy


@dataclass
class StreamingLLM(MemoryPolicy):
    n_sink: int = 4
    name = "streaming_llm"

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        # Newer tokens score higher; sinks score above everything.
        s = positions.float()
        return torch.where(positions < self.n_sink, torch.full_like(s, float("inf")), s)
