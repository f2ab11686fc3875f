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

import json
import time
from dataclasses import dataclass, field

import torch

from celeris.attention import gqa_sdpa
from celeris.errors import CelerisError
from celeris.generation import top_p_filter
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


def default_beam_settings(device: torch.device | str) -> tuple[int, int, bool]:
    """(W, L, adaptive) when the user gives none.

    On a CPU: one beam, its length chosen per step up to 6 (`adaptive`, see `choose_length`). How much
    a verify of n tokens costs there depends on the machine's matmul kernels: on one 2-core machine a
    4-token verify cost about one plain step, on another 1.6 plain steps while 2–3 tokens cost ~1.1,
    so no fixed length is best everywhere (docs/speculative.md). On a GPU a verify of 40 tokens costs
    about one plain step (launch-bound at batch 1), and 8 x 5 was the fastest setting measured on an H200.
    """
    return (1, 6, True) if torch.device(device).type == "cpu" else (8, 5, False)


FIXED_CPU_LENGTH = 4  # the CPU default when more than one beam is asked for (adaptive needs one beam)


_COSTS: dict[str, torch.Tensor] = {}


def _costs_key(model, max_len: int) -> str:
    """What a verify-cost table depends on: the machine, torch, threads, the model's shape, dtype, device."""
    from celeris.info import cpu_name

    p, c = next(model.parameters()), model.config
    return "|".join(str(x) for x in (cpu_name(), torch.__version__, torch.get_num_threads(), p.device, p.dtype, c.model_type,
                                     c.hidden_size, c.num_hidden_layers, c.vocab_size, max_len))


def _costs_file():
    from celeris.models import cache_root

    return cache_root() / "verify_costs.json"


@torch.inference_mode()
def verify_costs(model, max_len: int, context: int = 64, repeats: int = 3) -> torch.Tensor:
    """Measured cost of one target forward of n tokens after a `context`-token cache, relative to n = 1.

    Returns `[max_len + 1]` (index n; index 0 unused). Timed here, on this machine, with the same call
    the decoding loop makes (4-D mask, position ids, the `gqa_sdpa` / `skinny_linear` context of the
    caller); median of `repeats` rounds after a warm-up round, rounds interleaved over n (~1.2 s for
    SmolLM2-135M and max_len 6 on a 2-core CPU). Kept for the process and in
    `$CELERIS_CACHE/verify_costs.json`, keyed by CPU model, torch version, thread count, device, dtype,
    the model's shape and `max_len`, so a one-shot `celeris generate` pays it once per machine; delete
    that file to measure again. A table only steers how many drafted tokens are verified, never the output.
    """
    from transformers import DynamicCache

    from celeris.generation import sync_device
    from celeris.io import write_json

    key = _costs_key(model, max_len)
    if key in _COSTS:
        return _COSTS[key]
    path = _costs_file()
    saved: dict = {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        saved = obj if isinstance(obj, dict) else {}
    except (OSError, ValueError, RecursionError):
        pass  # no file yet, or a damaged one: measure (and rewrite it)
    entry = saved.get(key)
    if isinstance(entry, list) and len(entry) == max_len + 1 and all(isinstance(x, int | float) for x in entry):
        try:
            table = torch.tensor([float(x) for x in entry])
        except OverflowError:
            table = torch.zeros(0)
        if table.shape == (max_len + 1,) and bool(torch.isfinite(table).all()) and bool((table[1:] > 0).all()):
            _COSTS[key] = table
            return table
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (1, context + max_len), generator=g).to(p.device)
    cache = DynamicCache(config=model.config)
    _target_forward(model, ids[:, :context], None, None, cache)
    secs: dict[int, list[float]] = {n: [] for n in range(1, max_len + 1)}
    for r in range(repeats + 1):
        for n in range(1, max_len + 1):
            allowed = torch.ones(n, context + n, dtype=torch.bool, device=p.device).tril(context)
            mask = torch.where(allowed, torch.zeros((), dtype=p.dtype), torch.finfo(p.dtype).min)[None, None]
            pos = torch.arange(context, context + n, device=p.device)[None]
            sync_device(p.device)
            t0 = time.perf_counter()
            _target_forward(model, ids[:, context : context + n], mask, pos, cache)
            sync_device(p.device)
            if r:
                secs[n].append(time.perf_counter() - t0)
            cache.crop(context)
    med = torch.tensor([0.0] + [sorted(secs[n])[len(secs[n]) // 2] for n in range(1, max_len + 1)])
    _COSTS[key] = med / med[1]
    try:
        write_json(path, {**saved, key: [round(float(x), 4) for x in _COSTS[key]]})
    except OSError:
        pass  # a read-only cache directory only costs the measurement again next time
    return _COSTS[key]


def _expected_tokens(cum_logp: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row P(drafted 1..j right) `[B, j]` (finished rows zeroed) and the expected tokens committed over
    live rows when verifying k = 2..j+1 tokens `[j]`."""
    p = cum_logp[:, 1:].exp() * live[:, None]
    return p, live.sum() + p.sum(0).cumsum(0)


def worth_drafting_on(cum_logp: torch.Tensor, live: torch.Tensor, costs: torch.Tensor, max_len: int) -> bool:
    """After drafting j tokens (cum_logp `[B, j + 1]`), can a longer draft still win `choose_length`?

    P(drafted 1..i right) only falls with i, so verifying k > j + 1 tokens commits at most
    E(j + 1) + (k − j − 1)·P(1..j right); drafting stops when no such bound beats the best known k.
    """
    p, expected = _expected_tokens(cum_logp, live)  # expected: k = 2..j+1
    j = p.shape[1]
    if j + 1 >= max_len:
        return False
    best = (expected / costs[2 : j + 2]).max()
    ks = torch.arange(j + 2, max_len + 1, device=costs.device)
    bound = expected[-1] + (ks - j - 1) * p[:, -1].sum()
    return bool((bound / costs[ks]).max() > best)


def choose_length(cum_logp: torch.Tensor, live: torch.Tensor, costs: torch.Tensor) -> int:
    """Tokens to verify this step (2..L), from the drafter's own confidence and the measured costs.

    cum_logp `[B, L]`: the beam's cumulative drafter log-probability per depth (column 0 = 0, g0);
    live `[B]`; costs `[>= L + 1]` from `verify_costs`. Verifying k tokens commits, in expectation,
    1 + sum_{j < k} P(drafted 1..j all right); the drafter's probability estimates that (its top-1
    accuracy tracks its confidence: 0.11 at p < 0.2, 0.96 at p >= 0.9 on held-out prompts,
    docs/speculative.md). Returns the k with the most expected tokens (over live rows) per unit cost.
    """
    _, expected = _expected_tokens(cum_logp, live)  # [L-1]: k = 2..L
    return int((expected / costs[2 : cum_logp.shape[1] + 1]).argmax()) + 2


def check_beam_settings(beam_width: int, beam_length: int) -> None:
    if not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise CelerisError(f"beam width must be between 1 and {MAX_BEAM_WIDTH}, got {beam_width}")
    if not 2 <= beam_length <= MAX_BEAM_LENGTH:
        raise CelerisError(f"beam length must be between 2 and {MAX_BEAM_LENGTH} (it counts the guaranteed token), got {beam_length}")


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
          top_p: float = 1.0) -> torch.Tensor:
    """The target's own choice at every position: logits `[..., V]` -> ids `[...]`. Above temperature 0 a draw from
    the law `sample_next` draws from: softmax(logits / T), cut to its `top_p` nucleus when top_p < 1."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
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
    adaptive: bool = False,
) -> list[torch.Tensor]:
    """Generate after `input_ids` `[B, T]` (left-padded when B > 1, with `attention_mask` `[B, T]`).

    With `adaptive` (one beam only), `beam_length` is the longest draft: each step drafts while a longer
    draft can still pay (`worth_drafting_on`) and verifies the prefix length `choose_length` picks from the
    drafter's confidence and this machine's measured verify costs (`verify_costs`). The acceptance rule is
    unchanged, so the output is too.

    Returns the new ids of each row (a list of B 1-D tensors), truncated after the first EOS and at
    `max_new_tokens`: at temperature 0 exactly what `celeris.generation.decode` returns per prompt.
    """
    check_beam_settings(beam_width, beam_length)
    if adaptive and beam_width != 1:
        raise CelerisError(f"an adaptive draft length needs one beam (beam width 1), got {beam_width}")
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stats = stats if stats is not None else SpeculativeStats()
    with gqa_sdpa(model):  # the tree mask would otherwise make HF copy every K/V head per layer and step
        return _decode(model, drafter, input_ids, max_new_tokens, beam_width, beam_length, temperature, eos_ids,
                       generator, attention_mask, stats, adaptive)


def _decode(model, drafter, input_ids, max_new_tokens, beam_width, beam_length, temperature, eos_ids, generator,
            attention_mask, stats: SpeculativeStats, adaptive: bool = False) -> list[torch.Tensor]:
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
    # From here on every forward carries 2..W·L tokens: on CPUs where it measures faster, their linear layers
    # run in `celeris.skinny`'s form (about one token's cost there). The prefill keeps plain decoding's path.
    with skinny_linear(model, auto=True), skinny_linear(drafter, auto=True):
        costs = verify_costs(model, L).to(device) if adaptive else None
        while not bool(done.all()):
            t1 = time.perf_counter()
            if costs is None:
                beams = beam_search(drafter, h, g0, W, L)  # [B, W, L]
            else:  # draft L, verify the prefix with the most expected tokens per unit of measured cost
                live_f = (~done).float()
                beams, cum = beam_search(drafter, h, g0, W, L, return_logp=True,
                                         keep_going=lambda c, live=live_f: worth_drafting_on(c[:, 0], live, costs, L))
                beams = beams[:, :, : choose_length(cum[:, 0], live_f, costs)]
            Lk = beams.shape[2]
            arangeL = torch.arange(Lk, device=device)
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
            stats.unpacked_tokens += int(live.sum()) * W * Lk
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
