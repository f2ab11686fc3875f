"""kvpress presses as peers, run the way kvpress runs them (its pipeline's protocol): the context is
prefilled in one forward inside the press's hooks (compressed once, after full attention), then the
question and the answer are decoded over the compressed cache with positions continuing from the
original length. Peak physical KV bytes are measured by a hook that runs before the press's."""

from __future__ import annotations

import contextlib
import time

import torch

from celeris.errors import CelerisError
from celeris.memory.runner import MemoryResult, attention_layers, eager_attention, kv_bytes

PRESSES = ("KnormPress", "SnapKVPress", "StreamingLLMPress", "ObservedAttentionPress", "TOVAPress",
           "ExpectedAttentionPress")


def make_press(name: str, budget_fraction: float):
    """A kvpress press keeping `budget_fraction` of the context (kvpress's compression_ratio = 1 - budget)."""
    try:
        import kvpress
    except ImportError:
        raise CelerisError("kvpress is not installed: pip install 'kvpress>=0.5.5,<0.6'") from None
    if name not in PRESSES:
        raise CelerisError(f"unknown press {name!r}; valid: {', '.join(PRESSES)}")
    ratio = 1.0 - budget_fraction
    return getattr(kvpress, name)(compression_ratio=min(max(ratio, 0.0), 0.99))


@torch.inference_mode()
def run_with_press(model, input_ids: torch.Tensor, split: int, press, max_new_tokens: int = 32,
                   eos_ids=()) -> MemoryResult:
    """Greedy answer to `input_ids` `[1, T]` whose first `split` tokens are the context."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    peak = 0

    def measure(module, args, kwargs, output):
        nonlocal peak
        peak = max(peak, kv_bytes(cache))

    eos = set(int(e) for e in eos_ids)
    split = max(1, min(split, input_ids.shape[1] - 1))
    ctx, question = input_ids[:, :split], input_ids[:, split:]
    start = time.perf_counter()
    handles = [a.register_forward_hook(measure, with_kwargs=True) for a in attention_layers(model)]
    try:
        with eager_attention(model), press(model) if press is not None else contextlib.nullcontext():
            model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seen = split
        new: list[int] = []
        ids = question
        while True:
            phys = cache.get_seq_length()
            q = ids.shape[1]
            out = model(input_ids=ids, position_ids=torch.arange(seen, seen + q)[None],
                        cache_position=torch.arange(phys, phys + q), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            seen += q
            peak = max(peak, kv_bytes(cache))
            tok = int(out.logits[0, -1].argmax())
            new.append(tok)
            if tok in eos or len(new) >= max_new_tokens:
                break
            ids = torch.tensor([[tok]])
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - start
    end = kv_bytes(cache)
    n_layers = len(cache.layers)
    tokens = sum(layer.keys.shape[-2] for layer in cache.layers)
    per_token = end / max(1, tokens)
    return MemoryResult(new, int(input_ids.shape[1]), peak, end, int(round(per_token * n_layers * seen)),
                        tokens / (n_layers * seen), seconds, 1, {"policy": type(press).__name__})
