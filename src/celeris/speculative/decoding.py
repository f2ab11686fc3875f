"""ReDrafter decoding: draft a beam tree, verify it with ONE target forward, commit the accepted path.

Acceptance works the same way at every temperature. For each node of the packed tree the target
picks its own next token x from P(· | the node's prefix): the argmax at temperature 0, otherwise a
fresh independent sample from softmax(logits / T), the same distribution `celeris.generation.decode`
samples from. Walking from the root, if x equals one of the node's drafted children we descend into
it; otherwise x is committed as the "bonus" token and the step ends. Every committed token is thus a
draw from the target's own distribution given the committed prefix, so the output distribution is
exactly plain sampling's (and at T = 0 the output is plain greedy's), whatever the drafter proposes.
Deduplication makes each prefix one node, so the walk equals "the longest beam whose drafted tokens
all equal the x of their parent node", which is computed for all beams at once.

This differs from ReDrafter's own sampling (u < P/Q per drafted token), which is not exact for
deterministic beam candidates; the scheme here gives up some acceptance at T > 0 to be exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from celeris.attention import gqa_sdpa
from celeris.errors import CelerisError
from celeris.skinny import skinny_linear
from celeris.speculative.drafter import RecurrentDrafter
from celeris.speculative.tree import beam_search, keep_cache_entries, pack_beams, tree_attention_mask, unpack

MAX_BEAM_WIDTH = 64
MAX_BEAM_LENGTH = 16


@dataclass
class SpeculativeStats:
    """Counters of one decoding call (all rows together)."""

    steps: int = 0  # target forwards after the prefill
    new_tokens: int = 0  # committed tokens, after truncation at EOS / max_new_tokens
    committed_per_step: list[float] = field(default_factory=list)  # mean over live rows, per step
    packed_tokens: int = 0  # tokens verified after dedup (summed over rows and steps)
    unpacked_tokens: int = 0  # W·L per row and step: what verifying every beam separately would cost
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per target forward (accepted drafted tokens + the bonus token)."""
        c = self.committed_per_step
        return sum(c) / len(c) if c else 0.0

    @property
    def packing_saving(self) -> float:
        """Fraction of verified tokens removed by deduplicating shared prefixes."""
        return 1 - self.packed_tokens / self.unpacked_tokens if self.unpacked_tokens else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "new_tokens": self.new_tokens, "tokens_per_step": self.tokens_per_step,
                "packed_tokens": self.packed_tokens, "unpacked_tokens": self.unpacked_tokens,
                "packing_saving": self.packing_saving, "draft_seconds": self.draft_seconds,
                "verify_seconds": self.verify_seconds, "prefill_seconds": self.prefill_seconds}


def default_beam_settings(device: torch.device | str) -> tuple[int, int]:
    """(W, L) when the user gives none. On a CPU a verify forward of 4 tokens costs about one plain
    step (with `celeris.skinny`), 5 or more cost visibly more, so one beam of 4 was fastest there
    (the W x L sweep in docs/speculative.md); on a GPU a verify of 40 tokens costs about one plain step
    (launch-bound at batch 1), and 8 x 5 was the fastest setting measured on an H200 (docs/speculative.md)."""
    return (1, 4) if torch.device(device).type == "cpu" else (8, 5)


def check_beam_settings(beam_width: int, beam_length: int) -> None:
    if not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise CelerisError(f"beam width must be between 1 and {MAX_BEAM_WIDTH}, got {beam_width}")
    if not 2 <= beam_length <= MAX_BEAM_LENGTH:
        raise CelerisError(f"beam length must be between 2 and {MAX_BEAM_LENGTH} (it counts the guaranteed token), got {beam_length}")


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The target's own choice at every position: logits `[..., V]` -> ids `[...]`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


def _target_forward(model, ids, mask, pos, cache):
    """Final-norm hidden states `[B, n, H]` and logits `[B, n, V]` of the unmodified HF model."""
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    h = out.last_hidden_state
    return h, model.get_output_embeddings()(h)


@torch.inference_mode()
def redrafter_decode(
    model,
    drafter: RecurrentDrafter,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    beam_width: int = 4,
    beam_length: int = 5,
    temperature: float = 0.0,
    eos_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    stats: SpeculativeStats | None = None,
) -> list[torch.Tensor]:
    """Generate after `input_ids` `[B, T]` (left-padded when B > 1, with `attention_mask` `[B, T]`).

    Returns the new ids of each row (a list of B 1-D tensors), truncated after the first EOS and at
    `max_new_tokens`: at temperature 0 exactly what `celeris.generation.decode` returns per prompt.
    """
    check_beam_settings(beam_width, beam_length)
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stats = stats if stats is not None else SpeculativeStats()
    with gqa_sdpa(model):  # the tree mask would otherwise make HF copy every K/V head per layer and step
        return _decode(model, drafter, input_ids, max_new_tokens, beam_width, beam_length, temperature, eos_ids,
                       generator, attention_mask, stats)


def _decode(model, drafter, input_ids, max_new_tokens, beam_width, beam_length, temperature, eos_ids, generator,
            attention_mask, stats: SpeculativeStats) -> list[torch.Tensor]:
    from transformers import DynamicCache

    device = input_ids.device
    B, T = input_ids.shape
    W, L = beam_width, beam_length
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool().to(device)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)

    t0 = time.perf_counter()
    if bool(valid.all()):
        h, logits = _target_forward(model, input_ids, None, None, cache)  # the same call as plain decoding
    else:  # left padding: causal over real tokens only, pad queries see themselves (no all-masked row)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        mask = torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None]
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        h, logits = _target_forward(model, input_ids, mask, pos, cache)
    g0 = _pick(logits[:, -1], temperature, generator)  # [B] guaranteed token, committed now
    h = h[:, -1]
    stats.prefill_seconds += time.perf_counter() - t0

    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    out = torch.full((B, max_new_tokens + L), -1, dtype=torch.long, device=device)
    out[:, 0] = g0
    n_out = torch.ones(B, dtype=torch.long, device=device)
    done = torch.isin(g0, eos) | (n_out >= max_new_tokens)
    arangeL = torch.arange(L, device=device)
    # From here on every forward carries 2..W·L tokens: on CPUs where it measures faster, their linear layers
    # run in `celeris.skinny`'s form (about one token's cost there). The prefill keeps plain decoding's path.
    with skinny_linear(model, auto=True), skinny_linear(drafter, auto=True):
        while not bool(done.all()):
            t1 = time.perf_counter()
            beams = beam_search(drafter, h, g0, W, L)  # [B, W, L]
            tree = pack_beams(beams)
            t2 = time.perf_counter()
            S = valid.shape[1]
            mask = tree_attention_mask(valid, tree, dtype)
            pos = valid.sum(1, keepdim=True) + tree.depth  # committed length + depth (RoPE positions)
            hs, logits = _target_forward(model, tree.tokens, mask, pos, cache)
            x = _pick(logits, temperature, generator)  # [B, N]: the target's token after each node
            nxt = unpack(x, tree.unpacker)  # [B, W, L]
            agree = (beams[:, :, 1:] == nxt[:, :, :-1]).long().cumprod(dim=2)  # drafted token k+1 equals parent's x
            n_acc, best = agree.sum(dim=2).max(dim=1)  # [B]: accepted drafted tokens, and on which beam
            path = tree.unpacker[torch.arange(B, device=device), best]  # [B, L] packed nodes of the best beam
            last = path.gather(1, n_acc[:, None])  # [B, 1] deepest accepted node
            bonus = x.gather(1, last)[:, 0]
            h = hs.gather(1, last[:, :, None].expand(-1, -1, hs.shape[-1]))[:, 0]
            # commit: accepted drafted tokens (beams[best, 1..n]) then the bonus token
            live = ~done
            new = torch.cat([beams[torch.arange(B, device=device), best, 1:], bonus[:, None]], dim=1)  # [B, L]
            new = torch.where(arangeL[None] < n_acc[:, None], new, bonus[:, None])  # slot n_acc holds the bonus
            slots = n_out[:, None] + arangeL[None]  # write L slots, only n_acc + 1 count
            out.scatter_(1, slots.clamp(max=out.shape[1] - 1), torch.where(live[:, None], new, out.gather(1, slots.clamp(max=out.shape[1] - 1))))
            k_new = torch.where(live, n_acc + 1, 0)
            hit = torch.isin(new, eos) & (arangeL[None] < k_new[:, None])
            n_out = n_out + k_new
            done = done | hit.any(1) | (n_out >= max_new_tokens)
            # keep only the accepted path's K/V (the root g0 and n_acc drafted nodes)
            m = int(n_acc.max()) + 1
            keep_cache_entries(cache, S, path[:, :m])
            valid = torch.cat([valid, arangeL[None, :m] <= n_acc[:, None]], dim=1)
            g0 = bonus
            stats.steps += 1
            stats.committed_per_step.append(float(k_new[live].float().mean()))
            stats.packed_tokens += int(tree.num_packed[live].sum())
            stats.unpacked_tokens += int(live.sum()) * W * L
            stats.draft_seconds += t2 - t1
            stats.verify_seconds += time.perf_counter() - t2
    results = []
    for b in range(B):  # truncate each row after its first EOS and at max_new_tokens
        row = out[b, : min(int(n_out[b]), max_new_tokens)]
        if eos.numel():
            stop = torch.isin(row, eos).nonzero()
            if stop.numel():
                row = row[: int(stop[0, 0]) + 1]
        results.append(row.clone())
        stats.new_tokens += row.numel()
    return results
