"""Grouped-query attention through SDPA without copying the cache, also when a mask is given.

Hugging Face's `sdpa` path repeats every K/V head to all query heads (`repeat_kv`, a full copy of
the cache per layer and step) whenever an attention mask is passed, because the fused GQA path is
only taken on CUDA or without a mask. On CPU, with left-padded batches or a tree mask, that copy
can be most of a decoding step: at batch 64 with 150 cached tokens, SmolLM2's step took 0.31-0.43 s
with the copy and 0.19-0.20 s without it (2 CPU threads). `gqa_sdpa(model)` temporarily routes the model's attention through
`scaled_dot_product_attention(..., enable_gqa=True)`, the same math without the copy. It is
registered with transformers' attention and mask interfaces; no modeling file is touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "celeris_gqa_sdpa"
ENGINE_NAME = "celeris_engine"
SMALL_QUERY = 32  # up to this many query tokens (decode and verify steps), attention runs as two matmuls
_registered = False


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """The `sdpa` attention function, with K/V heads shared by `enable_gqa` instead of repeated."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def engine_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The engine's attention: `gqa_sdpa_forward` for a prompt, two matmuls for a step of few tokens.

    On the CPUs measured, SDPA's flash kernel costs 0.1–2 ms for ONE query over 128–2,048 cached slots
    (it is built for many queries), and its rows were not bitwise independent of the number of queries at
    2,048 slots; the matmul form costs a fraction of that and computes each query row alike whatever the
    step's size, which is what lets a verify step reproduce plain steps (docs/engine.md). Query heads that
    share a K/V head are stacked into one product, so the cache is never copied. `attention_mask` is a
    boolean `[B, 1, q, kv]` (True = attend) or additive float mask.
    """
    B, H, q, D = query.shape
    weights = _ENGINE_WEIGHTS[0]
    if (q > SMALL_QUERY and not weights) or attention_mask is None:
        return gqa_sdpa_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    kvh, L = key.shape[1], key.shape[2]
    g = H // kvh
    scale = scaling if scaling is not None else D**-0.5
    qg = query.reshape(B, kvh, g * q, D)
    compiled = torch.compiler.is_compiling()
    if compiled:  # products and sums that inductor fuses into its own loops (a bmm call costs ~40 µs here)
        scores = (qg[:, :, :, None, :].float() * key[:, :, None].float()).sum(-1)
    else:
        scores = torch.matmul(qg, key.transpose(-1, -2)).float()
    scores = scores.view(B, kvh, g, q, L) * scale
    mask = attention_mask.view(B, 1, 1, q, L)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).view(B, kvh, g * q, L)
    if compiled:
        out = (probs[..., None] * value[:, :, None].float()).sum(-2).to(value.dtype)
    else:
        out = torch.matmul(probs.to(value.dtype), value)
    return out.view(B, H, q, D).transpose(1, 2).contiguous(), (probs.view(B, H, q, L) if weights else None)


_ENGINE_WEIGHTS = [False]


@contextmanager
def engine_attention_weights() -> Iterator[None]:
    """Within the block, the engine's attention returns its post-softmax weights `[B, heads, q, slots]` (for a
    memory policy that reads them), computing every step, prompt chunks included, in the two-product form."""
    old = _ENGINE_WEIGHTS[0]
    _ENGINE_WEIGHTS[0] = True
    try:
        yield
    finally:
        _ENGINE_WEIGHTS[0] = old


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(ENGINE_NAME, engine_attention_forward)
    AttentionMaskInterface.register(ENGINE_NAME, sdpa_mask)
    _registered = True


@contextmanager
def gqa_sdpa(model) -> Iterator[None]:
    """Within the block, a model that uses `sdpa` attention uses `gqa_sdpa_forward` instead.

    Models with another attention implementation (eager, where scores are read) are left alone.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
