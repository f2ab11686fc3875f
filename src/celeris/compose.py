"""Two systems on one request: ReDrafter decoding under a KV-memory policy, on the engine.

    session = MemorySession(engine, policy, budget)          the prompt in chunks, evictions every n_up tokens
    loop:
        beams = drafter's draft after (h, g0)                 as `redrafter_engine_decode`
        verify the packed tree at slots filled.., RoPE positions seen + depth
        commit the accepted path (root g0 + accepted drafts), cut where the token count reaches the next
        multiple of n_up; session.committed(a + 1) then evicts exactly there, between two steps

What "identical" means here: at temperature 0 the tokens equal plain decoding under the same policy
(`run_with_memory`), evictions at the same token counts: a step never commits past an eviction point (the
accepted path is cut there, at a cost of at most one step's extra tokens per n_up), so the cache each step
sees is the one a plain run would have at that token.
A policy that reads attention weights (H2O, NAMM) gets, for each verify step, the rows of the accepted nodes
only, with the columns of their in-step ancestors moved where `commit` moves those slots: the rows a plain
run would have recorded. Verify steps run eagerly (the engine's compiled graphs for several tokens are not
bitwise its single-token graph, docs/engine.md), so identity holds by construction, as the tests check.
"""

from __future__ import annotations

import time

import torch

from celeris.errors import CelerisError
from celeris.memory.policies.base import Budget, MemoryPolicy
from celeris.memory.runner import MemoryResult, MemorySession
from celeris.speculative.decoding import SpeculativeStats, check_beam_settings
from celeris.speculative.drafter import RecurrentDrafter
from celeris.speculative.engine_decoding import draft, engine_step_costs, final_tokens, record_step
from celeris.speculative.tree import ancestor_mask, pack_beams, unpack


def _keep_accepted_rows(session: MemorySession, filled: int, keep: torch.Tensor) -> None:
    """The attention rows the last verify recorded, reduced to the accepted nodes, their in-step columns moved
    from slot filled + keep[j] to filled + j (where `Engine.commit` put them)."""
    if session.recorder is None:
        return
    a = keep.numel()
    for buf in session.recorder.buffers:
        rows = buf[-1][:, keep]  # [kv, a, span]
        new = torch.zeros_like(rows)
        new[..., :filled] = rows[..., :filled]
        new[..., filled : filled + a] = rows[..., filled + keep]
        buf[-1] = new


@torch.inference_mode()
def redrafter_with_memory(
    engine,
    drafter: RecurrentDrafter,
    input_ids: torch.Tensor,
    policy: MemoryPolicy,
    budget: Budget | None,
    max_new_tokens: int,
    beam_length: int = 4,
    adaptive: bool = True,
    n_up: int = 128,
    eos_ids: list[int] | tuple[int, ...] = (),
    seed: int = 0,
    stats: SpeculativeStats | None = None,
    keep_cache: bool = False,
    on_commit=None,
) -> MemoryResult:
    """Greedy answer to `input_ids` `[1, T]` with one ReDrafter beam of up to `beam_length` tokens (`adaptive`:
    the length chosen per step as in `redrafter_engine_decode`) while `policy` keeps the engine's cache at
    `budget`. Returns the memory runner's `MemoryResult`; `stats` gets the drafting figures. `on_commit(ids)` gets
    each step's tokens as they are decided; an exception it raises stops decoding."""
    check_beam_settings(1, beam_length)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise CelerisError("drafting under a memory policy takes one prompt of shape [1, T]")
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stats = stats if stats is not None else SpeculativeStats()
    L = beam_length
    costs = engine_step_costs(engine, drafter, L) if adaptive else None  # timed before any attention is recorded
    step_fn, engine._step = engine._step, engine._forward  # verify eagerly (see the module docstring)
    session = MemorySession(engine, policy, budget, n_up, seed)
    eos = set(int(e) for e in eos_ids)
    out: list[int] = []
    start = time.perf_counter()
    extra = {"policy": policy.name, "budget": str(session.budget) if session.budget else "threshold",
             "n_up": session.n_up, "drafter": True}
    try:
        with session.attention() as extra["attention"]:
            t, s = input_ids.shape[1], 0
            while s < t:
                e = min(t, (s // session.n_up + 1) * session.n_up)
                logits = session.feed(input_ids[:, s:e])
                s = e
            h = session.backend.hidden
            g0 = logits.argmax().view(1)
            out.append(int(g0))
            if on_commit is not None:
                on_commit(out[:])
            stats.prefill_seconds += time.perf_counter() - start
            while out[-1] not in eos and len(out) < max_new_tokens:
                t1 = time.perf_counter()
                beams = draft(drafter, h, g0, 1, L, costs)
                tree = pack_beams(beams)
                t2 = time.perf_counter()
                filled = engine.filled
                hs, vlogits = engine.verify_step(tree.tokens, session.seen + tree.depth, ancestor_mask(tree)[0])
                x = vlogits.argmax(-1)  # [1, N]
                nxt = unpack(x, tree.unpacker)
                a = int((beams[:, :, 1:] == nxt[:, :, :-1]).long().cumprod(dim=2).sum(dim=2)[0, 0])
                a = min(a, max_new_tokens - len(out) - 1)  # never cache more than plain decoding would
                a = min(a, session.until_eviction() - 1)  # stop at the eviction point: it falls between steps
                keep = tree.unpacker[0, 0][: a + 1]
                engine.commit(keep)
                _keep_accepted_rows(session, filled, keep)
                session.committed(a + 1)
                bonus = x[:, keep[-1]]
                committed = beams[0, 0, 1 : a + 1].tolist() + [int(bonus)]
                out += committed
                if on_commit is not None:
                    on_commit(committed)
                h, g0 = hs[:, keep[-1]], bonus
                record_step(stats, beams, tree, len(committed), t1, t2)
    finally:
        session.close()
        engine._step = step_fn
    out = final_tokens(out, eos, max_new_tokens)
    stats.new_tokens += len(out)
    extra["speculative"] = stats.to_dict()
    return session.result(out, int(input_ids.shape[1]), time.perf_counter() - start, extra, keep_cache)
