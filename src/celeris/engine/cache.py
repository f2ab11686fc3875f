"""A static KV cache written in place, whose attention reads only a bucket of the filled length.

Hugging Face's `StaticCache` hands attention the whole preallocated cache every step, so a 128-token
answer in a 2,048-slot cache attends over 2,048 slots. `SpanCache` keeps the same preallocated
tensors (written with `index_copy_`, so a compiled step never reallocates) but returns only the first
`span` slots, where `span` is the smallest bucket that holds the filled length plus the step's tokens.
Each bucket is one compiled graph; the mask the engine passes covers exactly `span` slots.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def bucket(n: int, max_len: int) -> int:
    """The smallest bucket ≥ n (never past `max_len`)."""
    for b in BUCKETS:
        if b >= n:
            return min(b, max_len)
    return max_len


class SpanLayer(StaticLayer):
    """A `StaticLayer` whose `update` returns the first `span` slots only."""

    def __init__(self, max_cache_len: int, span: list[int]):
        super().__init__(max_cache_len)
        self._span = span  # shared with the cache and every layer: one int in a list

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, cache_kwargs)
        n = self._span[0]
        return keys[:, :, :n], values[:, :, :n]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._span[0], 0


class SpanCache(Cache):
    """`[1, kv_heads, max_len, head_dim]` per layer and K/V, preallocated; `span` slots visible to attention."""

    rows = 1

    def __init__(self, config, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.span = [min(BUCKETS[0], max_len)]
        cfg = config.get_text_config(decoder=True)
        super().__init__(layers=[self._layer(max_len) for _ in range(cfg.num_hidden_layers)])
        self.max_len = max_len
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        proto = torch.empty(self.rows, heads, 1, head_dim, dtype=dtype, device=device)
        for layer in self.layers:  # allocate now: the compiled step must see fixed addresses
            layer.lazy_initialization(proto, proto)

    def _layer(self, max_len: int) -> StaticLayer:
        return SpanLayer(max_len, self.span)

    def grow(self, max_len: int) -> None:
        """Reallocate every layer with room for `max_len` slots, keeping the contents (a compiled step recompiles
        once for the new size)."""
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
                new[:, :, : old.shape[2]] = old
                torch._dynamo.mark_static_address(new)
                setattr(layer, name, new)
            layer.max_cache_len = max_len
        self.max_len = max_len

    def set_span(self, n: int) -> None:
        self.span[0] = n

    def move(self, src: torch.Tensor, dst_start: int) -> None:
        """Copy slots `src` `[m]` to `dst_start .. dst_start + m` in every layer (gather first: no aliasing)."""
        m = src.numel()
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                t[:, :, dst_start : dst_start + m] = t.index_select(2, src)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))


class RowLayer(StaticLayer):
    """A `StaticLayer` `[rows, kv_heads, slots, head_dim]` whose rows are separate sequences, each at its own length.

    A step writes one token per row, row b's at its own slot `cache_position[b]`; a prefill (`row[0]` ≥ 0) writes a
    `[1, kv_heads, T, head_dim]` prompt into that one row. Either way the first `span` slots are returned."""

    def __init__(self, max_cache_len: int, span: list[int], row: list[int]):
        super().__init__(max_cache_len)
        self._span, self._row = span, row  # shared with the cache and every layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        slots = cache_kwargs["cache_position"]
        r = self._row[0]
        if r >= 0:  # one row's prompt: slots [T]
            keys, values = self.keys[r : r + 1], self.values[r : r + 1]
            keys.index_copy_(2, slots, key_states)
            values.index_copy_(2, slots, value_states)
        else:  # a step over rows 0..b−1: slots [b], one per row
            b = key_states.shape[0]
            keys, values = self.keys[:b], self.values[:b]
            at = slots.view(b, 1, 1, 1).expand_as(key_states)
            keys.scatter_(2, at, key_states)
            values.scatter_(2, at, value_states)
        n = self._span[0]
        return keys[:, :, :n], values[:, :, :n]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._span[0], 0


class RowCache(SpanCache):
    """`[rows, kv_heads, max_len, head_dim]` per layer and K/V: row b holds sequence b (`BatchEngine`).

    `set_row(b)` before a prompt's prefill into row b, `set_row(-1)` (steps over rows 0..B−1) after."""

    def __init__(self, config, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu", rows: int = 1):
        self.rows, self.row = rows, [-1]
        super().__init__(config, max_len, dtype, device)

    def _layer(self, max_len: int) -> StaticLayer:
        return RowLayer(max_len, self.span, self.row)

    def set_row(self, row: int) -> None:
        self.row[0] = row
