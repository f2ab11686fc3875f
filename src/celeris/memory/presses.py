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
    attention_for,
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


def press_needs_attention(press) -> bool:
    """Whether a press reads the attention weights, which only eager attention returns.

    Only those run eager (4x slower than SDPA on a 4k-token CPU prefill); the others run on the
    model's own attention, as kvpress runs them. SnapKV and TOVA compute their window's attention
    themselves when no weights are given."""
    if press is None:
        return False
    if hasattr(press, "policy"):
        return bool(press.policy.needs_attention)
    return type(press).__name__ == "ObservedAttentionPress"


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


def reference_logprobs(model, cache, question: torch.Tensor, seen: int, reference_ids: torch.Tensor) -> list[float]:
    """The question `[1, Q]` and the reference answer `[1, R]` in one forward over `cache` (whose batch
    size B may exceed 1: the same tokens over B caches of equal length): per row, the mean
    log-probability of the reference tokens."""
    b = cache.layers[0].keys.shape[0]
    ids = torch.cat([question, reference_ids], dim=1).expand(b, -1)
    phys, n = cache.get_seq_length(), ids.shape[1]
    out = model(input_ids=ids, position_ids=torch.arange(seen, seen + n)[None].expand(b, -1),
                cache_position=torch.arange(phys, phys + n), past_key_values=cache, use_cache=True,
                logits_to_keep=reference_ids.shape[1] + 1)
    return [answer_logprob(out.logits[j, :-1], reference_ids[0]) for j in range(b)]


def _answer(model, cache, question: torch.Tensor, seen: int, max_new_tokens: int, eos: set[int],
            reference_ids: torch.Tensor | None, on_step=None) -> tuple[list[int], dict]:
    """The question (and the answer) over a context cache whose `seen` tokens were prefilled: greedy
    tokens, or with `reference_ids` one teacher-forced forward and `answer_logprob`. Positions continue
    from `seen` (RoPE); cache slots from the cache's physical length."""
    new: list[int] = []
    extra: dict = {}
    ids = question
    if reference_ids is not None:
        extra["answer_logprob"] = reference_logprobs(model, cache, question, seen, reference_ids)[0]
        if on_step is not None:
            on_step()
        return new, extra
    while True:
        phys = cache.get_seq_length()
        q = ids.shape[1]
        out = model(input_ids=ids, position_ids=torch.arange(seen, seen + q)[None],
                    cache_position=torch.arange(phys, phys + q), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        seen += q
        if on_step is not None:
            on_step()
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        if tok in eos or len(new) >= max_new_tokens:
            return new, extra
        ids = torch.tensor([[tok]])


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

    def measure(*_args, **_kwargs):
        nonlocal peak
        peak = max(peak, kv_bytes(cache))

    split = max(1, min(split, input_ids.shape[1] - 1))
    ctx, question = input_ids[:, :split], input_ids[:, split:]
    start = time.perf_counter()
    handles = [a.register_forward_hook(measure, with_kwargs=True) for a in attention_layers(model)]
    try:
        with (attention_for(model, press_needs_attention(press)) as attention,
              press(model) if press is not None else contextlib.nullcontext()):
            model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
        with attention_for(model, False) as answer_attention:  # the question and answer read no attention weights
            new, extra = _answer(model, cache, question, split, max_new_tokens, {int(e) for e in eos_ids},
                                 reference_ids, on_step=measure)
    finally:
        for h in handles:
            h.remove()
    extra["policy"] = type(press).__name__
    extra["attention"], extra["answer_attention"] = attention, answer_attention
    seen = int(input_ids.shape[1]) + (reference_ids.shape[1] if reference_ids is not None else len(new) - 1)
    seconds = time.perf_counter() - start
    end = kv_bytes(cache)
    n_layers = len(cache.layers)
    tokens = sum(layer.keys.shape[-2] for layer in cache.layers)
    per_token = end / max(1, tokens)
    return MemoryResult(new, int(input_ids.shape[1]), peak, end, int(round(per_token * n_layers * seen)),
                        tokens / (n_layers * seen), seconds, 1, extra)


@dataclass
class ContextPrefill:
    """A context prefilled once under full attention, as the press protocol does before it compresses.

    In that protocol nothing a policy decides changes the prefill: every layer's keys, values and
    attention come from the full context, and the press only prunes what is stored afterwards. So one
    prefill serves every parameter vector an evolution tries (`compress_prefill` + `answer_prefill`
    give what `run_with_press` would, without running the model over the context again).
    `features[layer]` is whatever `record` returned for that layer (NAMM: the BAM input `[H, N, d_in]`)."""

    keys: list[torch.Tensor]  # per layer `[1, H, N, D]`, after RoPE, as cached
    values: list[torch.Tensor]
    features: list
    question: torch.Tensor  # `[1, Q]`
    split: int


@torch.inference_mode()
def prefill_context(model, input_ids: torch.Tensor, split: int, record) -> ContextPrefill:
    """Prefill the first `split` tokens of `input_ids` (eager attention, as `run_with_press`) and keep
    each layer's cache and `record(layer_idx, keys [H, N, D], values, attention [H_kv, N, N], positions [H_kv, N])`."""
    from transformers import DynamicCache

    kvpress = _kvpress()
    split = max(1, min(split, input_ids.shape[1] - 1))
    n_layers = len(attention_layers(model))
    keys: list = [None] * n_layers
    values: list = [None] * n_layers
    features: list = [None] * n_layers

    @dataclass
    class RecordingPress(kvpress.BasePress):
        def compress(self, module, hidden_states, k, v, attentions, kwargs):
            n_kv, n = k.shape[1], k.shape[2]
            i = module.layer_idx
            keys[i], values[i] = k, v
            att = gqa_mean(attentions, n_kv) if attentions is not None else None
            features[i] = record(i, k[0], v[0], att, torch.arange(n).expand(n_kv, n))
            return k, v

    cache = DynamicCache(config=model.config)
    with eager_attention(model), RecordingPress()(model):
        model(input_ids=input_ids[:, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return ContextPrefill(keys, values, features, input_ids[:, split:], split)


def compress_prefill(model, prefill: ContextPrefill, scores: list[torch.Tensor], budget_fraction: float):
    """A `DynamicCache` holding, per layer and KV head, the context tokens a `ScorerPress` with these
    scores `[H, N]` keeps (the newest token always; kvpress's `compute_n_kept` and `topk`)."""
    from kvpress.presses.scorer_press import compute_n_kept
    from transformers import DynamicCache

    ratio = min(max(1.0 - budget_fraction, 0.0), 0.99)
    cache = DynamicCache(config=model.config)
    for i, (k, v, s) in enumerate(zip(prefill.keys, prefill.values, scores, strict=True)):
        if ratio > 0:
            s = s.float().clone()
            s[:, -1] = float("inf")
            idx = s[None].topk(compute_n_kept(k.shape[2], ratio), dim=-1).indices
            idx = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            k, v = k.gather(2, idx).contiguous(), v.gather(2, idx).contiguous()
        cache.update(k, v, i)
    return cache


@torch.inference_mode()
def answer_prefill(model, prefill: ContextPrefill, cache, max_new_tokens: int = 32, eos_ids=(),
                   reference_ids: torch.Tensor | None = None) -> tuple[list[int], dict]:
    """`run_with_press`'s answer (greedy tokens, or `answer_logprob` with `reference_ids`) over `cache`."""
    with attention_for(model, False):  # as `run_with_press` answers
        return _answer(model, cache, prefill.question, prefill.split, max_new_tokens, {int(e) for e in eos_ids},
                       reference_ids)
