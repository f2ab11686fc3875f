"""Likelihood-free temperature sampling and CALM generation (one backbone step per K tokens).

The head only gives samples, never probabilities, so temperature T is applied by rejection:

* `exact_temperature_sample` — write 1/T = n + α (n = ⌊1/T⌋, α ∈ [0, 1)). Stage 1 draws n samples and
  accepts when all are identical (probability ∝ P(x)ⁿ). Stage 2 is a Bernoulli factory for P(x)^α:
  for i = 1, 2, …: draw x′; if x′ = x accept, else reject with probability α/i. Together the output
  has probability ∝ P(x)^{1/T}. Domain 0 < T ≤ 1; the expected number of draws grows fast as T falls.
* `batch_temperature_sample` — the reference code's approximation: draw N = 200 samples, count the
  multiplicity k_x of each distinct chunk, and pick x ∝ C(k_x, n) for the largest n′ ≤ n = 1/T that
  some chunk reaches. Needs 1/T to be an integer. When no chunk repeats n times the step runs at the
  higher temperature 1/n′; `calm_generate` warns once and records it (`fallback_steps`,
  `highest_temperature_used`).

Samples are compared as decoded K-token chunks, not as latents.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from celeris.errors import CelerisError

Draw = Callable[[int], list[tuple[int, ...]]]  # draw(m) -> m decoded chunks


def check_temperature(temperature: float, sampler: str) -> None:
    if sampler not in ("exact", "batch"):
        raise CelerisError(f"unknown sampler {sampler!r}; choose exact or batch")
    if not 0 < temperature <= 1:
        raise CelerisError(f"temperature must be in (0, 1] for likelihood-free sampling, got {temperature}")
    if sampler == "batch" and abs(1 / temperature - round(1 / temperature)) > 1e-6:
        raise CelerisError(f"the batch sampler needs 1/temperature to be an integer (1, 1/2, 1/3, ...), got {temperature}")


class _Stream:
    """Draws chunks lazily in batches (one head call per batch) and hands them out one at a time."""

    def __init__(self, draw: Draw, batch: int) -> None:
        self.draw, self.batch, self.buf, self.used = draw, batch, [], 0

    def next(self) -> tuple[int, ...]:
        if not self.buf:
            self.buf = list(reversed(self.draw(self.batch)))
        self.used += 1
        return self.buf.pop()


def exact_temperature_sample(draw: Draw, temperature: float, generator: torch.Generator | None = None,
                             batch: int = 64, max_draws: int = 100_000) -> tuple[tuple[int, ...], int, float]:
    """One chunk with probability ∝ P(x)^{1/T}; returns (chunk, number of draws used, T)."""
    check_temperature(temperature, "exact")
    inv = 1.0 / temperature
    n = int(math.floor(inv + 1e-9))
    alpha = inv - n if inv - n > 1e-9 else 0.0
    s = _Stream(draw, batch)
    while s.used < max_draws:
        x = s.next()
        if any(s.next() != x for _ in range(n - 1)):
            continue  # stage 1 rejected: the n samples were not all identical
        if alpha == 0.0:
            return x, s.used, temperature
        i = 1
        while s.used < max_draws:  # stage 2: Bernoulli factory for P(x)^α
            if s.next() == x:
                return x, s.used, temperature
            if float(torch.rand((), generator=generator)) < alpha / i:
                break
            i += 1
    raise CelerisError(f"the exact sampler drew {max_draws} samples without accepting; use a higher temperature or --sampler batch")


def batch_temperature_sample(draw: Draw, temperature: float, num_samples: int = 200,
                             generator: torch.Generator | None = None) -> tuple[tuple[int, ...], int, float]:
    """The approximate batch sampler: x ∝ C(k_x, n′) over `num_samples` draws; returns (chunk, draws,
    temperature used = 1/n′, higher than `temperature` when no chunk reached multiplicity n)."""
    check_temperature(temperature, "batch")
    chunks = draw(num_samples)
    n = round(1 / temperature)
    if n == 1:
        return chunks[0], num_samples, 1.0
    counts = Counter(chunks)
    for nn in range(n, 0, -1):  # fall back to a smaller n′ (a higher temperature) when no chunk repeats n times
        cand = [(x, math.comb(k, nn)) for x, k in counts.items() if k >= nn]
        if cand:
            w = torch.tensor([c for _, c in cand], dtype=torch.float64)
            return cand[int(torch.multinomial(w, 1, generator=generator))][0], num_samples, 1.0 / nn
    raise AssertionError("unreachable: every chunk has multiplicity >= 1")


@dataclass
class CALMGeneration:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    steps: int
    seconds: float
    draws: int
    temperature: float = 1.0
    fallback_steps: int = 0  # batch-sampler steps that ran at a higher temperature than asked
    highest_temperature_used: float = 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "new_tokens": self.new_tokens, "steps": self.steps,
                "tokens_per_second": self.tokens_per_second, "prompt_tokens": self.prompt_tokens,
                "seconds": self.seconds, "head_samples": self.draws, "temperature": self.temperature,
                "fallback_steps": self.fallback_steps, "highest_temperature_used": self.highest_temperature_used}


@torch.no_grad()
def calm_generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                  sampler: str = "batch", num_samples: int = 200, seed: int = 0) -> CALMGeneration:
    """Generate `max_new_tokens` tokens in exactly ⌈max_new_tokens / K⌉ backbone steps.

    The prompt is left-padded with EOS to a whole number of chunks (it must hold at least K tokens).
    T = 1 draws one head sample per step; otherwise `sampler` ("exact" or "batch") applies T.
    """
    from transformers import DynamicCache

    check_temperature(temperature, sampler)
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    K = model.config.patch_size
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) < K:
        raise CelerisError(f"the prompt has {len(ids)} tokens, fewer than K = {K}; give a longer prompt")
    pad = (-len(ids)) % K
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    chunks = torch.tensor([eos] * pad + ids).view(1, -1, K)
    max_pos = model.config.max_position_embeddings
    steps_needed = math.ceil(max_new_tokens / K)
    if chunks.shape[1] + steps_needed > max_pos:
        raise CelerisError(f"prompt + output need {chunks.shape[1] + steps_needed} chunk positions, the model has {max_pos}")
    g = torch.Generator().manual_seed(seed)
    model.eval()
    t0 = time.perf_counter()
    cache = DynamicCache()
    h, cache = model.hidden_states(chunks, cache, 0)
    pos, out, steps, draws = chunks.shape[1], [], 0, 0
    fallback_steps, highest = 0, temperature
    while len(out) < max_new_tokens:
        hl = h[0, -1]

        def draw(m: int, hl=hl) -> list[tuple[int, ...]]:
            toks = model.autoencoder.decode_tokens(model.head(hl, m, g))  # [m, K]
            return [tuple(t) for t in toks.tolist()]

        if temperature == 1.0:
            chunk, used, t_used = draw(1)[0], 1, 1.0
        elif sampler == "exact":
            chunk, used, t_used = exact_temperature_sample(draw, temperature, g)
        else:
            chunk, used, t_used = batch_temperature_sample(draw, temperature, num_samples, g)
        draws += used
        if t_used > temperature + 1e-9:
            fallback_steps += 1
            highest = max(highest, t_used)
        out.extend(chunk)
        steps += 1
        if len(out) >= max_new_tokens:
            break
        h, cache = model.hidden_states(torch.tensor(chunk).view(1, 1, K), cache, pos)
        pos += 1
    seconds = time.perf_counter() - t0
    out = out[:max_new_tokens]
    if fallback_steps:
        warnings.warn(f"batch sampler: at {fallback_steps} of {steps} steps no chunk repeated {round(1 / temperature)} times "
                      f"in {num_samples} samples, so those steps ran at a higher temperature (up to {highest:g}, asked "
                      f"{temperature:g}); raise --samples or use --sampler exact", stacklevel=1)
    return CALMGeneration(tokenizer.decode(out), out, len(ids), len(out), steps, seconds, draws, temperature,
                          fallback_steps, highest)
