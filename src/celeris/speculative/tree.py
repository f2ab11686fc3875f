"""Beam-search drafting and dynamic tree attention (ReDrafter, arXiv 2403.09919 §2–3 and App. A.1).

One decoding step, all tensor operations (no Python loop over beams or tokens):

    beams      = beam_search(drafter, h, g0, W, L)           [B, W, L]  column 0 = g0, the guaranteed token
    tree       = dedup_prefix(beams)                          [B, W, L]  smallest beam sharing beams[i, :k+1]
    packed     = pack_beams(beams, tree)                      [B, N]     each distinct prefix once, N ≤ W·L − W + 1
    unpacker   = get_unpacker(packed, tree)                   [B, W, L]  packed.tokens[unpacker] == beams
    mask, pos  = tree_attention_mask(...), depth position ids
    one forward of the unmodified Hugging Face model with a 4-D additive mask over its DynamicCache
    accept     = longest drafted prefix the target agrees with (+ the target's own "bonus" token)
    keep_cache_entries(...)                                   keep only the accepted path's K/V

`valid` `[B, S]` marks which cache slots are real (prompt left-padding and, at batch > 1, the slack
of rows that accepted fewer tokens than the longest row are False); every query attends to the valid
past plus its own ancestors in the tree. Position ids are each row's committed length + depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from celeris.speculative.drafter import RecurrentDrafter


@torch.inference_mode()
def beam_search(drafter: RecurrentDrafter, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int,
                return_logp: bool = False, keep_going: Callable[[torch.Tensor], bool] | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draft `beam_width` beams of `beam_length` tokens; column 0 is the guaranteed token g0.

    h `[B, H]` (the target hidden state that produced g0), g0 `[B]` target ids -> beams `[B, W, L]`
    target ids, best first. All beams start as [g0] with log P = [0, −inf, ...], so the first
    expansion yields W distinct beams instead of W copies of the best one.
    With `return_logp`, also returns each beam's cumulative drafter log-probability per depth `[B, W, L]`
    (column 0 is 0: g0 is certain). `keep_going(logp)`, with `return_logp`, is asked after each depth
    whether drafting deeper can still pay; the beams end at the first no (fewer than L columns).
    """
    B, W, Vd = g0.shape[0], beam_width, drafter.config.draft_vocab_size
    beams = g0[:, None, None].expand(B, W, 1)
    score = torch.full((B, W), -1e30, device=h.device)
    score[:, 0] = 0
    state: torch.Tensor | None = None
    hw = h[:, None, :].float().expand(B, W, h.shape[-1])
    hist = torch.zeros(B, W, 1, device=h.device)
    for _ in range(beam_length - 1):  # L−1 drafter calls, each over all beams at once
        state = drafter.rnn_step(state, beams[:, :, -1])  # [B, W, H]
        logp = torch.log_softmax(drafter(hw, state).float(), dim=-1)  # [B, W, Vd]
        top, idx = (score[:, :, None] + logp).flatten(1).topk(W, dim=-1)  # best W of the W·Vd extensions
        parent, tok = idx // Vd, idx % Vd
        beams = torch.cat([beams.gather(1, parent[:, :, None].expand(-1, -1, beams.shape[2])),
                           drafter.draft_to_target[tok][:, :, None]], dim=2)
        if return_logp:
            hist = torch.cat([hist.gather(1, parent[:, :, None].expand(-1, -1, hist.shape[2])), top[:, :, None]], dim=2)
        state = state.gather(1, parent[:, :, None].expand(-1, -1, state.shape[-1]))
        score = top
        if return_logp and keep_going is not None and beams.shape[2] < beam_length and not keep_going(hist):
            break
    return (beams, hist) if return_logp else beams


def dedup_prefix(beams: torch.Tensor) -> torch.Tensor:
    """prefix_tree `[B, W, L]`: for beam i and depth k, the smallest beam j with beams[j, :k+1] == beams[i, :k+1].

    Example: [[91,92,93,95],[91,92,94,96],[91,92,93,97]] -> [[0,0,0,0],[0,0,1,1],[0,0,0,2]].
    """
    matches = beams[:, :, None, :] == beams[:, None, :, :]  # [B, i, j, k]
    shared = matches.int().cumprod(dim=-1)  # 1 while beams i and j agree on 0..k
    return shared.argmax(dim=2)  # first j with a shared prefix (j = i always qualifies)


@dataclass
class PackedTree:
    """The deduplicated tree as one sequence per row.

    tokens `[B, N]` target ids; index `[B, N]` flat beam position i·L + k of each packed token;
    depth `[B, N]`; real `[B, N]` False on padding (rows with fewer distinct prefixes than N);
    unpacker `[B, W, L]` packed position of beams[:, i, k].
    """

    tokens: torch.Tensor
    index: torch.Tensor
    depth: torch.Tensor
    real: torch.Tensor
    unpacker: torch.Tensor

    @property
    def num_packed(self) -> torch.Tensor:
        """Real packed tokens per row `[B]`."""
        return self.real.sum(dim=1)


def pack_beams(beams: torch.Tensor, prefix_tree: torch.Tensor | None = None) -> PackedTree:
    """Keep each (beam i, depth k) whose prefix first occurs in beam i, in row-major order, so every
    ancestor precedes its descendants. beams `[B, W, L]` -> PackedTree with N = max kept per row."""
    B, W, L = beams.shape
    if prefix_tree is None:
        prefix_tree = dedup_prefix(beams)
    keep = (prefix_tree == torch.arange(W, device=beams.device)[None, :, None]).flatten(1)  # [B, W·L]
    count = keep.sum(dim=1)
    N = int(count.max())
    order = torch.argsort((~keep).int(), dim=1, stable=True)[:, :N]  # kept positions first, in order
    real = torch.arange(N, device=beams.device)[None, :] < count[:, None]
    tokens = beams.flatten(1).gather(1, order)
    # inverse map flat position -> packed position, then look up each beam's prefix owner
    where = torch.zeros(B, W * L, dtype=torch.long, device=beams.device)
    where.scatter_(1, order, torch.arange(N, device=beams.device).expand(B, N).contiguous())
    owner_flat = prefix_tree * L + torch.arange(L, device=beams.device)  # [B, W, L]
    unpacker = where.gather(1, owner_flat.flatten(1)).view(B, W, L)
    return PackedTree(tokens=tokens, index=order, depth=order % L, real=real, unpacker=unpacker)


def unpack(packed: torch.Tensor, unpacker: torch.Tensor) -> torch.Tensor:
    """Per-packed-token values `[B, N, ...]` -> per-beam values `[B, W, L, ...]`."""
    B, W, L = unpacker.shape
    idx = unpacker.flatten(1)
    if packed.dim() == 2:
        return packed.gather(1, idx).view(B, W, L)
    return packed.gather(1, idx[:, :, None].expand(-1, -1, packed.shape[-1])).view(B, W, L, packed.shape[-1])


def ancestor_mask(tree: PackedTree) -> torch.Tensor:
    """Boolean `[B, N, N]`: packed token p may attend to packed token q iff q is p or an ancestor of p."""
    B, W, L = tree.unpacker.shape
    N = tree.tokens.shape[1]
    beam, depth = tree.index // L, tree.depth  # [B, N]
    path = tree.unpacker.gather(1, beam[:, :, None].expand(-1, -1, L))  # [B, N, L]: the owning beam's nodes
    on_path = torch.arange(L, device=depth.device)[None, None, :] <= depth[:, :, None]
    mask = torch.zeros(B, N, N, dtype=torch.bool, device=depth.device)
    mask.scatter_(2, path, on_path)  # nodes deeper than p on its beam get False, ancestors True
    return mask | torch.eye(N, dtype=torch.bool, device=depth.device)  # padding rows see themselves only


def tree_attention_mask(valid: torch.Tensor, tree: PackedTree, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[B, 1, N, S + N]` mask: all valid past slots + ancestors; 0 = attend, finfo.min = blocked."""
    N = tree.tokens.shape[1]
    allowed = torch.cat([valid[:, None, :].expand(-1, N, -1), ancestor_mask(tree)], dim=2)
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def keep_cache_entries(cache, past_len: int, keep: torch.Tensor) -> None:
    """Keep, in place, the first `past_len` slots and then the packed slots `keep` `[B, m]` of every layer.

    The verify forward appended N packed slots after `past_len`; afterwards the cache holds
    past_len + m slots (gathered along the sequence dimension, rejected branches dropped).
    """
    m = keep.shape[1]
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)  # [B, heads, S + N, D]
            idx = (past_len + keep)[:, None, :, None].expand(t.shape[0], t.shape[1], m, t.shape[3])
            t[:, :, past_len : past_len + m] = t.gather(2, idx)  # gather copies first, so no aliasing
            setattr(layer, name, t[:, :, : past_len + m])
