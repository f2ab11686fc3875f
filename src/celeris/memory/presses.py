"""kvpress presses as peers, run the way kvpress runs them (its pipeline's protocol): the context is
prefilled in one forward inside the press's hooks (compressed once, after full attention), then the
question and the answer are decoded over the compressed cache with positions continuing from the
original length. Peak physical KV bytes are measured by a hook that runs before the press's."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from celeris.errors import CelerisError
from celeris.memory.policies.base import MemoryPolicy
from celeris.memory.runner import (
    MemoryResult,
    answer_logprob,
    attention_layers,
    eager_attention,
    gqa_mean,
    kv_bytes,
)

PRESSES = ("KnormPress", "SnapKVPress", "StreamingLLMPress", "ObservedAttentionPress", "TOVAPress",
           "ExpectedAttentionPress")


def _kvpress():
    try:
        import kvpress
    except ImportError:
        raise CelerisError("kvpress is not installed: pip install 'kvpress>=0.5.5,<0.6'") from None
    return kvpress


def make_press(name: str, budget_fraction: float):
    """A kvpress press keeping `budget_fraction` of the context (kvpress's compression_ratio = 1 - budget)."""
    kvpress = _kvpress()
    if name not in PRESSES:
        raise CelerisError(f"unknown press {name!r}; valid: {', '.join(PRESSES)}")
    ratio = 1.0 - budget_fraction
    return getattr(kvpress, name)(compression_ratio=min(max(ratio, 0.0), 0.99))


def policy_press(policy: MemoryPolicy, budget_fraction: float):
    """A Celeris policy as a kvpress `ScorerPress` (the spec's protocol A: one-shot compression of the
    context after a full-attention prefill, exactly as kvpress runs its own presses).

    Each layer's policy sees every context query's attention (GQA-averaged; NAMM's EMA over them is
    the same feature its chunked run would have at the end of the context), absolute positions
    0..N-1 and a fresh per-token state; the newest context token is always kept.
    """
    kvpress = _kvpress()

    @dataclass
    class CelerisPolicyPress(kvpress.ScorerPress):
        policy: MemoryPolicy | None = None

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            n_kv, n = keys.shape[1], keys.shape[2]
            att = None
            if self.policy.needs_attention:
                if attentions is None:
                    raise CelerisError(f"policy {self.policy.name!r} needs attention weights (eager attention)")
                att = gqa_mean(attentions, n_kv)
            positions = torch.arange(n).expand(n_kv, n)
            s = self.policy.score(module.layer_idx, keys[0], values[0], att, positions, {}).float().clone()
            s[:, -1] = float("inf")
            return s[None]

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if getattr(self.policy, "calibrating", False):  # NAMM's calibration pass: statistics, no eviction
                self.score(module, hidden_states, keys, values, attentions, kwargs)
                return keys, values
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    return CelerisPolicyPress(compression_ratio=min(max(1.0 - budget_fraction, 0.0), 0.99), policy=policy)


@torch.inference_mode()
def run_with_press(model, input_ids: torch.Tensor, split: int, press, max_new_tokens: int = 32,
                   eos_ids=(), reference_ids: torch.Tensor | None = None) -> MemoryResult:
    """Greedy answer to `input_ids` `[1, T]` whose first `split` tokens are the context.

    With `reference_ids` `[1, R]` nothing is generated: the question and the reference answer are fed
    in one forward over the compressed cache and `extra["answer_logprob"]` is the mean log-probability
    of the reference tokens (a dense signal for evolution)."""
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
        extra = {"policy": type(press).__name__}
        if reference_ids is not None:
            ids = torch.cat([question, reference_ids], dim=1)
            phys = cache.get_seq_length()
            out = model(input_ids=ids, position_ids=torch.arange(seen, seen + ids.shape[1])[None],
                        cache_position=torch.arange(phys, phys + ids.shape[1]), past_key_values=cache, use_cache=True,
                        logits_to_keep=reference_ids.shape[1] + 1)
            seen += ids.shape[1]
            peak = max(peak, kv_bytes(cache))
            extra["answer_logprob"] = answer_logprob(out.logits[0, :-1], reference_ids[0])
        while reference_ids is None:
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
                        tokens / (n_layers * seen), seconds, 1, extra)
