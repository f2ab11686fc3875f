"""L2 / key-norm (Devoto et al. 2024): keys with a LOW L2 norm attract attention, so keep them.

Score = -||k_i||. RoPE is a rotation, so post-RoPE cached keys give the same norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from celeris.memory.policies.base import MemoryPolicy


@dataclass
class L2Norm(MemoryPolicy):
    name = "l2"

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
