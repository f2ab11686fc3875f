"""ReDrafter on the fast engine (batch 1): draft, verify the packed tree in ONE `verify_step`, commit the path.

    h, logits = engine.prefill(ids);  g0 = pick(logits)
    loop:
        beams = beam_search(drafter, h, g0, W, L)          [1, W, L], column 0 = g0 (not yet in the cache)
        tree  = pack_beams(beams)                          each distinct prefix once, ancestors first
        hs, logits = engine.verify_step(tree.tokens, filled + depth, ancestor_mask(tree))
        x = pick(logits)                                   the target's own token after every node
        accept the longest beam whose drafted tokens equal their parent's x; the bonus token is x there
        engine.commit(root .. deepest accepted node)       an in-place gather in the static cache

The acceptance rule is `celeris.speculative.decoding`'s (exact at every temperature); only the target
forward and the cache bookkeeping are the engine's.
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
) -> torch.Tensor:
    """New ids `[n]` after `input_ids` `[1, T]`: at temperature 0 those of `engine_decode` on the same engine
    (where the engine's verify rows equal its single steps), above it a draw from the same distribution.

    `cached`: the first `cached` prompt tokens are already in the engine's slots (`Engine.extend`); only the rest
    is prefilled. `on_commit(ids)` gets each step's tokens as they are decided (the first token, then each step's
    accepted drafts and bonus), before the final cut at EOS / `max_new_tokens`; an exception it raises stops
    decoding with the engine's committed slots consistent (a server's cancel)."""
    check_beam_settings(beam_width, beam_length)
    if input_ids.shape[0] != 1:
        raise CelerisError("ReDrafter on the engine decodes one prompt at a time")
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stats = stats if stats is not None else SpeculativeStats()
    W, L = beam_width, beam_length
    t0 = time.perf_counter()
    h, logits = engine.extend(input_ids, cached) if cached else engine.prefill(input_ids)
    g0 = _pick(logits, temperature, generator)  # [1]
    stats.prefill_seconds += time.perf_counter() - t0
    eos = set(int(e) for e in eos_ids)
    out = [int(g0)]
    if on_commit is not None:
        on_commit(out[:])
    while int(out[-1]) not in eos and len(out) < max_new_tokens:
        if engine.filled + W * L > engine.max_len:
            raise CelerisError(f"the context is full: {engine.filled} + {W * L} tokens exceed the engine's {engine.max_len}")
        t1 = time.perf_counter()
        beams = beam_search(drafter, h.float(), g0, W, L)  # [1, W, L]
        tree = pack_beams(beams)
        t2 = time.perf_counter()
        hs, logits = engine.verify_step(tree.tokens, engine.filled + tree.depth, ancestor_mask(tree)[0])
        x = _pick(logits, temperature, generator)  # [1, N]
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
        stats.steps += 1
        stats.committed_per_step.append(float(len(committed)))
        stats.packed_tokens += int(tree.num_packed[0])
        stats.unpacked_tokens += W * L
        stats.draft_seconds += t2 - t1
        stats.verify_seconds += time.perf_counter() - t2
        if on_commit is not None:
            on_commit(committed)
    for i, tok in enumerate(out):  # truncate after the first EOS and at max_new_tokens
        if tok in eos:
            out = out[: i + 1]
            break
    out = out[:max_new_tokens]
    stats.new_tokens += len(out)
    return torch.tensor(out, dtype=torch.long)


class _TiedEmbedding(torch.nn.Module):
    """What `load_drafter` reads of a target: its config and its (tied) embedding matrix, as float."""

    def __init__(self, weight: torch.Tensor, config):
        super().__init__()
        self.emb, self.config = torch.nn.Embedding.from_pretrained(weight, freeze=True), config

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.emb


def load_drafter_for_engine(directory, engine, gguf_path=None) -> RecurrentDrafter:
    """`load_drafter` for an engine's model. A packed GGUF engine holds its embedding as int8 rows; the drafter
    was trained on (and is checked against) the file's exact Q8_0 values, read again here from `gguf_path`
    (default: the default model's file)."""
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
    return load_drafter(directory, _TiedEmbedding(weight, config))
