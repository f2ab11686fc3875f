"""ReDrafter on the fast engine (batch 1): draft, verify the packed tree in ONE `verify_step`, commit the path.

    h, logits = engine.prefill(ids);  g0 = pick(logits)
    loop:
        beams = beam_search(drafter, h, g0, W, L)          [1, W, L], column 0 = g0 (not yet in the cache)
        tree  = pack_beams(beams)                          each distinct prefix once, ancestors first
        hs, logits = engine.verify_step(tree.tokens, filled + depth, ancestor_mask(tree))
        x = pick(logits)                                   the target's own token after every node (its draw at T > 0)
        accept the longest beam whose drafted tokens equal their parent's x; the bonus token is x there
        engine.commit(root .. deepest accepted node)       an in-place gather in the static cache

The acceptance rule is `celeris.speculative.decoding`'s (exact at every temperature); only the target
forward and the cache bookkeeping are the engine's. With `top_p` < 1 each node's x is drawn from the target's
nucleus-cut law, the law plain decoding samples with that `top_p`, so the committed tokens follow that law: the
rule never compares a draft with anything but the target's own draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from celeris.errors import CelerisError
from celeris.speculative.decoding import SpeculativeStats, _pick, check_beam_settings
from celeris.speculative.drafter import RecurrentDrafter
from celeris.speculative.tree import ancestor_mask, beam_search, pack_beams, unpack


@torch.inference_mode()
def redrafter_engine_decode(
    engine,
    drafter: RecurrentDrafter,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    beam_width: int = 1,
    beam_length: int = 4,
    temperature: float = 0.0,
    eos_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    stats: SpeculativeStats | None = None,
    cached: int = 0,
    on_commit: Callable[[list[int]], None] | None = None,
    adaptive: bool = False,
    top_p: float = 1.0,
) -> torch.Tensor:
    """New ids `[n]` after `input_ids` `[1, T]`: at temperature 0 those of `engine_decode` on the same engine
    (where the engine's verify rows equal its single steps), above it a draw from plain sampling's law
    (`celeris.generation.sample_next` at this temperature and `top_p`, its nucleus cut when top_p < 1).

    `cached`: the first `cached` prompt tokens are already in the engine's slots (`Engine.extend`); only the rest
    is prefilled. `on_commit(ids)` gets each step's tokens as they are decided (the first token, then each step's
    accepted drafts and bonus), before the final cut at EOS / `max_new_tokens`; an exception it raises stops
    decoding with the engine's committed slots consistent (a server's cancel).

    With `adaptive` (one beam), `beam_length` is the longest draft: each step verifies the k = 1..L tokens
    with the most expected tokens per unit of cost, costs measured on this engine (`engine_step_costs`)."""
    check_beam_settings(beam_width, beam_length)
    if adaptive and beam_width != 1:
        raise CelerisError(f"an adaptive draft length needs one beam (beam width 1), got {beam_width}")
    if input_ids.shape[0] != 1:
        raise CelerisError("ReDrafter on the engine decodes one prompt at a time")
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= top_p <= 1:
        raise CelerisError(f"top_p must be between 0 and 1, got {top_p}")
    stats = stats if stats is not None else SpeculativeStats()
    W, L = beam_width, beam_length
    t0 = time.perf_counter()
    h, logits = engine.extend(input_ids, cached) if cached else engine.prefill(input_ids)
    g0 = _pick(logits, temperature, generator, top_p)  # [1]
    stats.prefill_seconds += time.perf_counter() - t0
    costs = engine_step_costs(engine, drafter, L) if adaptive else None
    eos = set(int(e) for e in eos_ids)
    out = [int(g0)]
    if on_commit is not None:
        on_commit(out[:])
    while int(out[-1]) not in eos and len(out) < max_new_tokens:
        if engine.filled + W * L > engine.max_len:
            raise CelerisError(f"the context is full: {engine.filled} + {W * L} tokens exceed the engine's {engine.max_len}")
        t1 = time.perf_counter()
        beams = draft(drafter, h, g0, W, L, costs)
        tree = pack_beams(beams)
        t2 = time.perf_counter()
        hs, logits = engine.verify_step(tree.tokens, engine.filled + tree.depth, ancestor_mask(tree)[0])
        x = _pick(logits, temperature, generator, top_p)  # [1, N]
        nxt = unpack(x, tree.unpacker)  # [1, W, L]
        agree = (beams[:, :, 1:] == nxt[:, :, :-1]).long().cumprod(dim=2)
        n_acc, best = agree.sum(dim=2).max(dim=1)
        a = int(n_acc[0])
        path = tree.unpacker[0, int(best[0])]  # [L] packed nodes of the best beam
        keep = path[: a + 1]  # the root g0 and the accepted drafted nodes
        engine.commit(keep)
        bonus = x[:, keep[-1]]  # [1]
        committed = beams[0, int(best[0]), 1 : a + 1].tolist() + [int(bonus)]
        out += committed
        h, g0 = hs[:, keep[-1]], bonus
        record_step(stats, beams, tree, len(committed), t1, t2)
        if on_commit is not None:
            on_commit(committed)
    out = final_tokens(out, eos, max_new_tokens)
    stats.new_tokens += len(out)
    return torch.tensor(out, dtype=torch.long)


def final_tokens(out: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """The answer a drafting loop produced: cut after the first EOS and at `max_new_tokens` (a step may overshoot)."""
    for i, tok in enumerate(out):
        if tok in eos:
            return out[: min(i + 1, max_new_tokens)]
    return out[:max_new_tokens]


def draft(drafter: RecurrentDrafter, h: torch.Tensor, g0: torch.Tensor, W: int, L: int,
          costs: torch.Tensor | None) -> torch.Tensor:
    """Beams `[1, W, L']` after (h `[1, H]`, g0 `[1]`): W x L, or with `costs` (one beam) the length
    `best_length` picks, drafting no deeper than `worth_drafting_deeper` allows."""
    if costs is None:
        return beam_search(drafter, h.float(), g0, W, L)
    beams, cum = beam_search(drafter, h.float(), g0, 1, L, return_logp=True,
                             keep_going=lambda c: worth_drafting_deeper(c[0, 0], costs))
    return beams[:, :, : best_length(cum[0, 0], costs)]


def record_step(stats: SpeculativeStats, beams: torch.Tensor, tree, committed: int, t_draft: float,
                t_verify: float) -> None:
    """One drafting step's figures: tokens committed, tree sizes, draft time (t_draft..t_verify) and verify time
    (t_verify..now)."""
    stats.steps += 1
    stats.committed_per_step.append(float(committed))
    stats.packed_tokens += int(tree.num_packed[0])
    stats.unpacked_tokens += int(beams.shape[1] * beams.shape[2])
    stats.draft_seconds += t_verify - t_draft
    stats.verify_seconds += time.perf_counter() - t_verify


def _expected(cum_logp: torch.Tensor) -> torch.Tensor:
    """Expected tokens committed when verifying k = 1..n tokens `[n]`, from the beam's cumulative drafter
    log-probabilities `[n]` (column 0 = 0 for g0): 1 + the sum over j < k of P(drafted 1..j all right)."""
    return 1 + torch.cat([cum_logp.new_zeros(1), cum_logp[1:].exp().cumsum(0)])


def best_length(cum_logp: torch.Tensor, costs: torch.Tensor) -> int:
    """The k in 1..n (n = drafted + 1) with the most expected tokens per unit of cost (`costs[k]`)."""
    n = cum_logp.shape[0]
    return int((_expected(cum_logp) / costs[1 : n + 1]).argmax()) + 1


def worth_drafting_deeper(cum_logp: torch.Tensor, costs: torch.Tensor) -> bool:
    """After drafting j tokens (cum_logp `[j + 1]`), can a longer draft still beat the best k so far?
    P(drafted 1..i right) only falls with i, so k > j + 1 commits at most E(j + 1) + (k − j − 1)·P(1..j)."""
    e = _expected(cum_logp)
    n, top = cum_logp.shape[0], costs.shape[0] - 1
    if n >= top:
        return False
    best = (e / costs[1 : n + 1]).max()
    ks = torch.arange(n + 1, top + 1)
    bound = e[-1] + (ks - n) * cum_logp[-1].exp()
    return bool((bound / costs[ks]).max() > best)


_STEP_COSTS: dict[tuple, torch.Tensor] = {}


@torch.inference_mode()
def engine_step_costs(engine, drafter: RecurrentDrafter, max_k: int, repeats: int = 5) -> torch.Tensor:
    """Cost of a drafting step that verifies k tokens, relative to one plain step: `[max_k + 1]` (index k).

    cost[k] = (verify_step of k tokens + (k − 1) drafter depths) / verify_step of 1 token, each the median of
    `repeats` interleaved rounds after a warm-up round (which also compiles each k), timed on this engine at
    its current cache span with throw-away tokens past the committed ones (nothing is committed). Kept per
    engine configuration for the process. The table steers how many tokens are verified, never which.
    """
    key = (id(engine.model), engine.info.quantize, engine.info.compiled, torch.get_num_threads(), max_k)
    if key in _STEP_COSTS:
        return _STEP_COSTS[key]
    filled = engine.filled
    h = torch.zeros(1, engine.model.config.hidden_size)
    g0 = torch.zeros(1, dtype=torch.long)
    secs: dict[int, list[float]] = {k: [] for k in range(max_k + 1)}  # 0: one drafter depth
    for r in range(repeats + 1):
        for k in range(1, max_k + 1):
            t0 = time.perf_counter()
            engine.verify_step(torch.zeros(1, k, dtype=torch.long))
            if r:
                secs[k].append(time.perf_counter() - t0)
            engine.filled = filled
        t0 = time.perf_counter()
        beam_search(drafter, h, g0, 1, 2)
        if r:
            secs[0].append(time.perf_counter() - t0)
    med = [sorted(v)[len(v) // 2] for _, v in sorted(secs.items())]
    costs = torch.tensor([0.0] + [(med[k] + (k - 1) * med[0]) / med[1] for k in range(1, max_k + 1)])
    _STEP_COSTS[key] = costs
    return costs


class _TiedEmbedding(torch.nn.Module):
    """What `load_drafter` reads of a target: its config and its (tied) embedding matrix, as float."""

    def __init__(self, weight: torch.Tensor, config):
        super().__init__()
        self.emb, self.config = torch.nn.Embedding.from_pretrained(weight, freeze=True), config

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.emb


def pack_drafter(drafter: RecurrentDrafter) -> RecurrentDrafter:
    """The drafter's linear layers rounded to int8 per output row (`Int8Linear`, the engine's output-layer
    kernel), in place. A drafting step reads the drafter's weights once per depth while the target's stream
    through the caches: 16 MB per depth as float32, 4 MB packed (docs/engine.md has the timings).
    The drafts may differ in rare near-ties; what is committed never does (every draft is verified)."""
    from torch import nn

    from celeris.engine.quant import Int8Linear

    for module in list(drafter.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    return drafter


def load_drafter_for_engine(directory, engine, gguf_path=None) -> RecurrentDrafter:
    """`load_drafter` for an engine's model. A packed GGUF engine holds its embedding as int8 rows; the drafter
    was trained on (and is checked against) the file's exact Q8_0 values, read again here from `gguf_path`
    (default: the default model's file), and its own layers are packed too (`pack_drafter`)."""
    from celeris.engine.quant import Int8Embedding
    from celeris.speculative.drafter import load_drafter

    if not isinstance(engine.model.get_input_embeddings(), Int8Embedding):
        return load_drafter(directory, engine.model)
    from gguf import GGUFReader

    from celeris.engine import gguf_blocks as G
    from celeris.models import default_gguf_path

    reader = GGUFReader(gguf_path or default_gguf_path())
    t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if t is None or t.tensor_type.name != "Q8_0":
        raise CelerisError("this engine's embedding is not the file's Q8_0 matrix; load the drafter on --quantize none")
    shape = (int(t.shape[1]), int(t.shape[0]))
    q8, d = G.q8_0_values(t.data, shape)
    weight = (q8.float().view(shape[0], -1, G.GROUP) * d[:, :, None]).view(shape)
    import copy

    config = copy.copy(engine.model.config)
    config.architectures = config.architectures or [type(engine.model).__name__]
    return pack_drafter(load_drafter(directory, _TiedEmbedding(weight, config)))
