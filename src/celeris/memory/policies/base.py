"""The one interface every KV-memory policy implements (kvpress-like: a policy only scores tokens).

The runner (`celeris.memory.runner`) calls `score` for every layer every `n_up` tokens and keeps,
per KV head, the highest-scoring cached tokens: the top `budget` of them (budget mode) or those
with `score >= 0` (threshold mode, NAMM's native rule). Anything a policy must remember per cached
token (H2O's accumulated attention, NAMM's EMA spectrogram) lives in `state` as tensors whose first
two dims are `[kv_heads, N]`; the runner gathers them along with the kept keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from celeris.errors import CelerisError


@dataclass(frozen=True)
class Budget:
    """How much cache to keep: a fraction of the tokens seen so far, or an absolute token count."""

    fraction: float | None = None
    tokens: int | None = None

    def keep(self, seen: int) -> int:
        """Tokens to keep per KV head after `seen` tokens have been processed."""
        if self.tokens is not None:
            return max(1, min(self.tokens, seen))
        return max(1, math.ceil((self.fraction or 1.0) * seen))

    def __str__(self) -> str:
        return f"{self.tokens}tok" if self.tokens is not None else f"{self.fraction:g}"


def parse_budget(value: str | float | int | None) -> Budget | None:
    """`0.25` -> a quarter of the tokens; `512` (an integer > 1) -> 512 tokens; None/'threshold' -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "threshold", "none")):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise CelerisError(f"budget must be a fraction in (0, 1] or a token count, got {value!r}") from None
    if not math.isfinite(x):
        raise CelerisError(f"budget must be a fraction in (0, 1] or a whole token count > 1, got {value!r}")
    if 0 < x <= 1:
        return Budget(fraction=x)
    if x > 1 and x == int(x):
        return Budget(tokens=int(x))
    raise CelerisError(f"budget must be a fraction in (0, 1] or a whole token count > 1, got {value!r}")


class MemoryPolicy:
    """Base class: subclasses set `name` and implement `score`.

    `needs_attention` asks the runner for the post-softmax attention of the queries since the last
    update (eager attention), averaged over each GQA group.
    """

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False
    # Threshold mode (budget None) is only meaningful for policies whose scores have a natural zero.
    supports_threshold: ClassVar[bool] = False

    def reset(self, seed: int = 0) -> None:
        """Called once per sample before prefill."""

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention: torch.Tensor | None,
        positions: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Scores `[kv_heads, N]` (higher = keep) for the cached `keys`/`values` `[kv_heads, N, head_dim]`.

        `attention` `[kv_heads, n_q, N]`: the last `n_q` queries over the current cache (zeros where a
        query came before the token), or None if `needs_attention` is False. `positions` `[kv_heads, N]`
        are absolute token positions (ascending). `state` is this layer's per-token memory.
        """
        raise NotImplementedError

    def describe(self) -> dict:
        return {"policy": self.name}
