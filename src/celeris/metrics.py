"""BrierLM: a likelihood-free language-model metric (CALM, Shao et al. 2025, arXiv 2510.27688).

The Brier score of a predictive distribution P for an outcome y is

    Brier(P, y) = 2·P(y) − Σ_x P(x)²,

strictly proper, so its expectation is maximised by the true distribution. Brier-n scores the n-gram
that starts at a position (outcome = the next n tokens, P = the model's joint over n-grams), and

    BrierLM = 100 · max(Brier-1 · Brier-2 · Brier-3 · Brier-4, 0)^(1/4).

Two estimators, both unbiased for the same quantity:

* `brier_two_sample` — for likelihood-free models (CALM): with two samples x₁, x₂ ~ P,
  1{x₁ = y} + 1{x₂ = y} − 1{x₁ = x₂} has expectation 2P(y) − ΣP². For n-grams the indicators are
  cumulative products over the n positions.
* `brier_rao_blackwell` (used by `brier_lm` for ordinary causal LMs) — the accuracy term is exact,
  2·∏ⱼ P(y_{i+j} | y_{<i+j}) from one teacher-forced pass; the collision term is Rao-Blackwellised:
  two samples are drawn step by step along sample 1's path and the term is
  1{both samples agree on the first n−1 tokens} · Σ_x P(x | prefix, x¹_{<n−1})². Rows whose samples
  already disagree contribute 0 to every longer n-gram, so only agreeing rows are rolled out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from celeris.errors import CelerisError
from celeris.models import context_limit

MAX_N = 4


@dataclass
class BrierResult:
    """BrierLM (×100), Brier-1..4 (raw, not ×100) with their standard errors, and how many n-gram start
    positions were scored."""

    brierlm: float
    brier: list[float]
    positions: int
    estimator: str = ""
    # std / √positions of each Brier-n (positions in one block are not independent: a lower bound)
    brier_stderr: list[float] = field(default_factory=list)

    @property
    def zero_reason(self) -> str | None:
        """Why BrierLM is 0 (a Brier-n estimate that is not positive), or None."""
        return brierlm_zero_reason(self.brier, self.brier_stderr)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "zero_reason": self.zero_reason}


def brierlm_zero_reason(brier: list[float], stderr: list[float] | None = None) -> str | None:
    """One line naming each Brier-n ≤ 0 that makes the geometric mean (BrierLM) 0, or None."""
    bad = [n for n, b in enumerate(brier, 1) if b <= 0]
    if not bad:
        return None
    se = (lambda n: f" ± {stderr[n - 1]:.4f}") if stderr else (lambda n: "")
    parts = ", ".join(f"Brier-{n} = {brier[n - 1]:.4f}{se(n)}" for n in bad)
    return (f"BrierLM is 0 because {parts} {'is' if len(bad) == 1 else 'are'} not positive "
            "(the geometric mean of Brier-1..4 is then 0); score a longer text or a stronger model")


def brierlm_from_scores(brier: list[float] | torch.Tensor) -> float:
    """100 · (∏ₙ Brier-n)^(1/N), and 0 as soon as one Brier-n ≤ 0 (weak models score 0).

    The reference code takes max(∏, 0); that differs only when an even number of Brier-n are negative
    (their product is then positive), where a score of 0 is the honest one.
    """
    b = [float(x) for x in brier]
    if min(b) <= 0:
        return 0.0
    return 100.0 * math.prod(b) ** (1.0 / len(b))


def brier_two_sample(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two-sample Brier-n estimates for n = 1..K, one row per scored position.

    x1, x2, y: `[positions, K]` token ids (two model samples and the truth). Returns `[positions, K]`:
    column n−1 is 1{x₁[:n]=y[:n]} + 1{x₂[:n]=y[:n]} − 1{x₁[:n]=x₂[:n]}.
    """
    acc1 = (x1 == y).long().cumprod(-1)
    acc2 = (x2 == y).long().cumprod(-1)
    coll = (x1 == x2).long().cumprod(-1)
    return (acc1 + acc2 - coll).float()


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def brier_rao_blackwell(model, block: torch.Tensor, n_max: int = MAX_N, generator: torch.Generator | None = None,
                        row_chunk: int = 64) -> torch.Tensor:
    """Rao-Blackwellised Brier-1..n_max at every position i = 1 … T−n_max of one token block.

    block: `[T]` token ids. Returns `[T − n_max, n_max]`; row i−1 scores the n-grams starting at i
    with context y_{<i}. `model` is a Hugging Face causal LM (a KV cache is reused for the rollouts).
    """
    T = block.numel()
    if T < n_max + 1:
        raise CelerisError(f"a block needs at least {n_max + 1} tokens, got {T}")
    out = model(input_ids=block[None], use_cache=True)
    cache = out.past_key_values
    probs = out.logits[0].float().softmax(-1)  # [T, V]; row t predicts token t+1
    pos = torch.arange(1, T - n_max + 1)  # scored start positions
    P = probs[pos - 1]  # [R, V] = P(· | y_{<i})
    # Exact accuracy term: 2·∏_{j<n} P(y_{i+j} | y_{<i+j}).
    tok_p = probs[:-1].gather(1, block[1:, None]).squeeze(1)  # tok_p[t-1] = P(y_t | y_{<t})
    acc = torch.stack([tok_p[pos - 1 + j] for j in range(n_max)], 1).cumprod(1)  # [R, n_max]
    coll = torch.zeros(len(pos), n_max)
    coll[:, 0] = (P * P).sum(-1)
    # Rollouts along sample 1; `alive` rows still have agreeing samples.
    x1, x2 = _sample(P, generator), _sample(P, generator)
    alive = (x1 == x2).nonzero().squeeze(1)
    for start in range(0, len(alive), row_chunk):
        rows = alive[start : start + row_chunk]
        _rollout(model, cache, T, pos[rows], x1[rows], rows, coll, n_max, generator)
    return 2.0 * acc - coll


def _rollout(model, cache, T: int, prefix_len: torch.Tensor, first: torch.Tensor, rows: torch.Tensor,
             coll: torch.Tensor, n_max: int, generator) -> None:
    """Extend each row's context y_{<i} with its agreed samples and fill coll[rows, 1:] in place."""
    import copy

    cur = copy.deepcopy(cache)
    cur.reorder_cache(torch.zeros(len(rows), dtype=torch.long))  # one copy of the block's cache per row
    # Attend to the row's own prefix only: positions j < i of the shared block, then its sampled tokens.
    mask = (torch.arange(T)[None] < prefix_len[:, None]).long()
    tok, live = first, torch.arange(len(rows))
    for k in range(1, n_max):
        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=torch.long)], 1)
        out = model(input_ids=tok[:, None], past_key_values=cur, attention_mask=mask,
                    position_ids=(prefix_len[live] + k - 1)[:, None], use_cache=True)
        p = out.logits[:, -1].float().softmax(-1)
        coll[rows[live], k] = (p * p).sum(-1)
        if k == n_max - 1:
            break
        a, b = _sample(p, generator), _sample(p, generator)
        keep = (a == b).nonzero().squeeze(1)
        if len(keep) == 0:
            break
        cur = out.past_key_values
        cur.reorder_cache(keep)
        mask, tok, live = mask[keep], a[keep], live[keep]


def _is_likelihood_free(model) -> bool:
    return bool(getattr(model, "is_likelihood_free", False))


def text_blocks(tokenizer, texts: list[str], block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined with EOS and cut into `[n, block_size]` blocks (a short tail is dropped)."""
    from celeris.lm import token_blocks

    blocks = token_blocks(texts, tokenizer, block_size, max_tokens)
    if len(blocks) == 0:
        raise CelerisError(f"the text is shorter than one block of {block_size} tokens; give more text or a smaller --block-size")
    return blocks


@torch.no_grad()
def brier_lm(model, tokenizer, texts: str | list[str], block_size: int = 128, max_tokens: int | None = 8192,
             seed: int = 0, row_chunk: int = 64) -> BrierResult:
    """BrierLM of `model` on `texts` (a string or documents), scored in blocks of `block_size` tokens.

    Ordinary Hugging Face causal LMs get the exact-accuracy, Rao-Blackwellised estimator at every
    position; likelihood-free models (`model.is_likelihood_free`, e.g. `celeris.calm.CALM`) get the
    two-sample estimator, from `model.brier_samples` (K ≥ 4: chunk-aligned positions) or
    `model.brier_rollout_samples` (K < 4: two roll-outs of ⌈4/K⌉ chunks every max(1, 4 // K) chunks).
    """
    if isinstance(texts, str):
        texts = [texts]
    if block_size < MAX_N + 1:
        raise CelerisError(f"block_size must be at least {MAX_N + 1}, got {block_size}")
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if _is_likelihood_free(model):
            K = model.config.patch_size
            if block_size % K:
                raise CelerisError(f"block_size {block_size} must be a multiple of the model's K = {K}")
            blocks = text_blocks(tokenizer, texts, block_size, max_tokens)
            if K >= MAX_N:  # one head sample covers the 4-gram: all chunk positions in one teacher-forced pass
                x1, x2, y = model.brier_samples(blocks, generator=g)
                estimator = "two-sample (chunk-aligned)"
            else:
                x1, x2, y = model.brier_rollout_samples(blocks, MAX_N, generator=g)
                estimator = f"two-sample (roll-outs of {-(-MAX_N // K)} chunks, every {max(1, MAX_N // K) * K} tokens)"
            scores = brier_two_sample(x1, x2, y)[:, :MAX_N]
        else:
            limit = context_limit(model.config)
            if limit is not None and block_size > limit:
                raise CelerisError(f"block_size {block_size} exceeds the model's context of {limit} tokens")
            blocks = text_blocks(tokenizer, texts, block_size, max_tokens)
            scores = torch.cat([brier_rao_blackwell(model, b, MAX_N, g, row_chunk) for b in blocks])
            estimator = "exact accuracy + Rao-Blackwellised collision"
    finally:
        model.train(was_training)
    brier = scores.mean(0).tolist()
    n = scores.shape[0]
    stderr = (scores.std(0) / math.sqrt(n)).tolist() if n > 1 else [float("nan")] * scores.shape[1]
    return BrierResult(brierlm_from_scores(brier), brier, int(n), estimator, stderr)


@torch.no_grad()
def cross_entropy(model, tokenizer, texts: str | list[str], block_size: int = 128, max_tokens: int | None = 8192) -> float:
    """Mean next-token cross-entropy (nats) of a causal LM over the same blocks `brier_lm` scores."""
    if isinstance(texts, str):
        texts = [texts]
    blocks = text_blocks(tokenizer, texts, block_size, max_tokens)
    model.eval()
    losses = [float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks]
    return sum(losses) / len(losses)
