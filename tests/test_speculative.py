"""ReDrafter: tree packing, tree attention, greedy identity, exact sampling, batch > 1, save/load, training."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import statistics

import pytest
import torch
from scipy.stats import chisquare

import celeris.speculative.decoding as D
import celeris.speculative.engine_decoding as ED
import celeris.speculative.tree as TR
from celeris.engine import Engine
from celeris.errors import CelerisError
from celeris.generation import decode, top_p_filter
from celeris.speculative import (
    SpeculativeStats,
    dedup_prefix,
    load_drafter,
    new_drafter,
    pack_beams,
    redrafter_decode,
    unpack,
)
from celeris.speculative.tree import tree_attention_mask


def _prompt(seed: int, n: int = 10, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test here runs on one CPU thread, as the project's benchmarks do: on a busy 2-core machine a second
    thread made these small forwards several times slower, and nothing tested here depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tree packing ------------------------------------------------------------------------------
def test_dedup_and_pack_match_the_reference_example():
    beams = torch.tensor([[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]]])
    assert dedup_prefix(beams).tolist() == [[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]]
    tree = pack_beams(beams)
    assert tree.tokens.tolist() == [[91, 92, 93, 95, 94, 96, 97]]
    assert tree.unpacker.tolist() == [[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]]
    assert tree.depth.tolist() == [[0, 1, 2, 3, 2, 3, 3]]


def test_pack_unpack_round_trips_on_random_beams():
    g = torch.Generator().manual_seed(0)
    beams = torch.randint(0, 3, (3, 5, 4), generator=g)  # tiny alphabet: many shared prefixes
    beams[:, :, 0] = 7
    tree = pack_beams(beams)
    assert torch.equal(unpack(tree.tokens, tree.unpacker), beams)
    n = tree.num_packed
    assert bool((n < 5 * 4).all()) and bool((n >= 4).all())
    # each row's real packed tokens are distinct prefixes: no two share (parent path, token)
    for b in range(3):
        prefixes = {tuple(beams[b, i, : k + 1].tolist()) for i in range(5) for k in range(4)}
        assert int(n[b]) == len(prefixes)


def test_tree_attention_logits_equal_per_beam_runs(context_llama):
    """One packed forward with the ancestor mask gives every beam the logits of its own plain run."""
    from transformers import DynamicCache

    model = context_llama
    prompt = _prompt(1)
    beams = torch.randint(0, 96, (1, 4, 4), generator=torch.Generator().manual_seed(2))
    beams[:, :, 0] = 5
    beams[:, 1, :2] = beams[:, 0, :2]  # shared prefixes exercise the dedup
    beams[:, 2, :3] = beams[:, 0, :3]
    tree = pack_beams(beams)
    valid = torch.ones(1, prompt.shape[1], dtype=torch.bool)

    def packed_logits(mask):
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        pos = prompt.shape[1] + tree.depth
        return unpack(model(input_ids=tree.tokens, attention_mask=mask, position_ids=pos, past_key_values=cache).logits,
                      tree.unpacker)  # [1, W, L, V]

    with torch.no_grad():
        per_beam = packed_logits(tree_attention_mask(valid, tree, torch.float32))
        causal = tree_attention_mask(valid, tree, torch.float32)
        causal[..., prompt.shape[1]:] = torch.full((tree.tokens.shape[1],) * 2, torch.finfo(torch.float32).min).triu(1)
        wrong = packed_logits(causal)  # every packed token sees all earlier ones, siblings included
        for i in range(4):
            ref = model(input_ids=torch.cat([prompt, beams[:, i]], dim=1)).logits[:, prompt.shape[1]:]
            torch.testing.assert_close(per_beam[:, i], ref, atol=1e-4, rtol=1e-4)
            if i:  # beams 1..3 share the packed sequence with earlier branches: a plain causal mask shows them those
                assert (wrong[:, i, -1] - ref[:, -1]).abs().max() > 0.1
    assert tree.tokens.shape[1] < 16  # the dedup removed the shared prefixes


# ---- greedy identity -----------------------------------------------------------------------------
# Every identity test runs on `context_llama` (conftest), whose greedy output depends on each cached token
# and position, and checks first that its reference output varies.
def _varied(ref: torch.Tensor) -> torch.Tensor:
    assert len(set(ref.tolist())) >= min(8, len(ref) // 3), f"reference output too uniform to test identity: {ref.tolist()}"
    return ref


@pytest.mark.parametrize(("width", "length"), [(1, 2), (4, 4), (8, 5)])
def test_greedy_output_identical_to_plain_decoding(context_llama, width, length):
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    for seed in range(3):
        ids = _prompt(seed)
        ref = _varied(decode(context_llama, ids, 30))
        got = redrafter_decode(context_llama, drafter, ids, 30, beam_width=width, beam_length=length)[0]
        assert torch.equal(got, ref)


def _oracle_beam_search(truth: torch.Tensor, prompt_len: int, seed: int):
    """A stand-in drafter that proposes random beams plus the true continuation cut at a random depth,
    so long accepted runs (and the cache gather of deep paths) are exercised."""
    g = torch.Generator().manual_seed(seed)
    state = {"cache": None}

    def search(drafter, h, g0, W, L):
        beams = torch.randint(0, 96, (1, W, L), generator=g)
        beams[:, :, 0] = g0
        pos = state["pos"]
        cont = torch.cat([truth[pos : pos + L], torch.zeros(L, dtype=torch.long)])[:L]
        k = int(torch.randint(1, L + 1, (1,), generator=g))
        beams[:, W - 1, :k] = cont[:k]
        return beams

    state["pos"] = prompt_len
    return search, state


def _decode_with_oracle_drafts(model, ids, n: int, monkeypatch, ref: torch.Tensor, seed: int,
                               width: int = 3, length: int = 5) -> tuple[torch.Tensor, SpeculativeStats]:
    """ReDrafter fed `_oracle_beam_search` drafts (the true continuation `ref` on the last beam, cut at random)."""
    drafter = new_drafter(model, torch.arange(96), seed=1)
    search, state = _oracle_beam_search(torch.cat([ids[0], ref]), ids.shape[1], seed)
    keep = D.keep_cache_entries

    def tracking_keep(cache, past_len, path):
        keep(cache, past_len, path)
        state["pos"] = cache.layers[0].keys.shape[2]  # the next g0 sits right after the cache

    with monkeypatch.context() as m:
        m.setattr(D, "beam_search", search)
        m.setattr(D, "keep_cache_entries", tracking_keep)
        stats = SpeculativeStats()
        got = D.redrafter_decode(model, drafter, ids, n, beam_width=width, beam_length=length, stats=stats)[0]
    return got, stats


def test_greedy_identity_with_long_accepted_runs(context_llama, monkeypatch):
    for seed in range(3):
        ids = _prompt(seed)
        ref = _varied(decode(context_llama, ids, 40))
        got, stats = _decode_with_oracle_drafts(context_llama, ids, 40, monkeypatch, ref, seed)
        assert torch.equal(got, ref)
        assert stats.tokens_per_step > 2.0  # the oracle beams were accepted
        assert stats.steps < 39


def _keep_off_by_one(cache, past_len: int, keep: torch.Tensor) -> None:
    """`keep_cache_entries` with an off-by-one in the gather: each kept slot takes its left neighbour's K/V."""
    m = keep.shape[1]
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            idx = (past_len + keep - 1)[:, None, :, None].expand(t.shape[0], t.shape[1], m, t.shape[3])  # the bug: - 1
            t[:, :, past_len : past_len + m] = t.gather(2, idx)
            setattr(layer, name, t[:, :, : past_len + m])


def _positions_by_packed_index(target_forward):
    """`_target_forward` whose verify forwards place packed token j at committed length + j, not + its depth."""
    def forward(model, ids, mask, pos, cache):
        if mask is not None and mask.shape[-1] > ids.shape[1]:  # a verify forward (the prefill's mask is square)
            pos = pos[:, :1] + torch.arange(ids.shape[1], device=ids.device)
        return target_forward(model, ids, mask, pos, cache)
    return forward


@pytest.mark.parametrize("bug", ["cache gather off by one", "positions by packed index"])
def test_greedy_identity_test_catches_cache_and_position_bugs(context_llama, monkeypatch, bug):
    """The identity check above fails against a deliberately broken loop on `context_llama` (it would not on a
    model whose greedy output ignores the context)."""
    if bug == "cache gather off by one":
        monkeypatch.setattr(D, "keep_cache_entries", _keep_off_by_one)
    else:
        monkeypatch.setattr(D, "_target_forward", _positions_by_packed_index(D._target_forward))
    differ = 0
    for seed in range(3):
        ids = _prompt(seed)
        ref = decode(context_llama, ids, 40)  # plain decoding uses neither patched function
        got, _ = _decode_with_oracle_drafts(context_llama, ids, 40, monkeypatch, ref, seed)
        differ += int(not torch.equal(got, ref))
    assert differ == 3


def test_eos_truncation_matches_plain_decoding(context_llama):
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    ids = _prompt(4)
    full = _varied(decode(context_llama, ids, 30))
    eos = [int(full[7])]
    ref = decode(context_llama, ids, 30, eos_ids=eos)
    got = redrafter_decode(context_llama, drafter, ids, 30, beam_width=4, beam_length=4, eos_ids=eos)[0]
    assert torch.equal(got, ref) and int(got[-1]) == eos[0] and len(ref) < 30


def test_batch_greater_than_one_matches_each_prompt(context_llama):
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    prompts = [_prompt(s, n)[0] for s, n in [(0, 6), (1, 11), (2, 9)]]
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    got = redrafter_decode(context_llama, drafter, ids, 25, beam_width=4, beam_length=4, attention_mask=mask)
    for p, g in zip(prompts, got, strict=True):
        assert torch.equal(g, _varied(decode(context_llama, p[None], 25)))


# ---- exact sampling ----------------------------------------------------------------------------
# The joint law of the first K_SAMPLE tokens over a 5-token vocabulary, sampled thousands of times (rows of a batch
# are independent draws), against plain sampling's law computed by enumeration. The drafts are the target's own best
# beams, so drafted tokens are accepted at every depth: the acceptance rule, dedup of shared prefixes below the root,
# the tree mask at T > 0, the accepted-path cache gather and a verified length that changes per step (the adaptive
# loop) all shape the tested law, which a 2-token law never sees.
SV, K_SAMPLE, T_SAMPLE = 5, 4, 1.0
SAMPLE_PROMPT = torch.tensor([[1, 3, 2, 0, 3]])


class _TargetLaw:
    """The target's next-token log-probabilities at T_SAMPLE after any context (a tuple of ids), memoised."""

    def __init__(self, model) -> None:
        self.model, self.memo = model, {}

    def logp(self, contexts: list[tuple[int, ...]]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(contexts) if c not in self.memo]
        if todo:  # right padding is harmless to a causal model: each row is read at its own last token
            n = max(map(len, todo))
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([list(c) + [0] * (n - len(c)) for c in todo])).logits
            last = logits[torch.arange(len(todo)), torch.tensor([len(c) - 1 for c in todo])]
            self.memo.update(zip(todo, torch.log_softmax(last.double() / T_SAMPLE, dim=-1), strict=True))
        return torch.stack([self.memo[c] for c in contexts])

    def joint(self, prompt: torch.Tensor, k: int = K_SAMPLE, top_p: float = 1.0) -> torch.Tensor:
        """P(x1..xk) of plain sampling `[SV**k]` (with its `top_p` nucleus cut), at index x1·SV^(k−1) + ... + xk."""
        law = torch.ones(1, dtype=torch.float64)
        for d in range(k):
            prefixes = itertools.product(range(SV), repeat=d)
            step = top_p_filter(self.logp([tuple(prompt[0].tolist()) + x for x in prefixes]).exp(), top_p)
            law = (law[:, None] * step / step.sum(dim=1, keepdim=True)).flatten()
        return law


@pytest.fixture(scope="module")
def sampler():
    """A tiny Llama over SV tokens whose next-token laws depend on the context and are neither flat nor one-hot
    (mean top-1 probability ≈ 0.6), and its memoised law."""
    model = _sampler_model()
    return model, _TargetLaw(model)


def _sampler_model():
    from celeris.models import new_model

    return new_model("nano", vocab_size=SV, max_position_embeddings=64, seed=0, initializer_range=0.3, hidden_size=32,
                     intermediate_size=64).eval()


class _AcceptanceReplay:
    """Follows each row's committed tokens through a ReDrafter call and, with `oracle`, drafts for it.

    It spies on `pack_beams`, `_pick` and `keep_cache_entries` and replays each step's acceptance with the
    module's own `unpack` (so a patched acceptance is replayed as it runs). The oracle stands in for `beam_search`:
    the W best beams under the target's exact law after the row's committed tokens. Drafts may depend on anything
    but the verify step's own draws, and these depend on committed tokens only. Rows that hold K_SAMPLE tokens
    already (their sample is fixed) get placeholder drafts.
    """

    def __init__(self, law: _TargetLaw, monkeypatch, oracle: bool) -> None:
        self.law, self.prompt = law, tuple(SAMPLE_PROMPT[0].tolist())
        self.committed: list[tuple[int, ...]] = []
        self.accepted: list[int] = []  # drafted tokens accepted, per step and row still sampling
        step = {}
        pick, pack, keep = D._pick, D.pack_beams, D.keep_cache_entries

        def pack_spy(beams, prefix_tree=None):
            step["beams"], step["tree"] = beams, pack(beams, prefix_tree)
            return step["tree"]

        def pick_spy(logits, temperature, generator):
            step["x"] = pick(logits, temperature, generator)
            return step["x"]

        def keep_spy(cache, past_len, path):
            beams, committed = step["beams"], self._rows(len(step["beams"]))
            nxt = D.unpack(step["x"], step["tree"].unpacker)
            n_acc, best = (beams[:, :, 1:] == nxt[:, :, :-1]).long().cumprod(dim=2).sum(dim=2).max(dim=1)
            self.accepted += [int(n) for n, c in zip(n_acc, committed, strict=True) if len(c) + 1 < K_SAMPLE]
            self.committed = [c + tuple(beams[b, best[b], : int(n_acc[b]) + 1].tolist()) for b, c in enumerate(committed)]
            keep(cache, past_len, path)

        monkeypatch.setattr(D, "pack_beams", pack_spy)
        monkeypatch.setattr(D, "_pick", pick_spy)
        monkeypatch.setattr(D, "keep_cache_entries", keep_spy)
        if oracle:
            monkeypatch.setattr(D, "beam_search", self.beam_search)

    def _rows(self, B: int) -> list[tuple[int, ...]]:
        self.committed = self.committed or [()] * B
        return self.committed

    def beam_search(self, drafter, h, g0, W, L, return_logp=False, keep_going=None):
        contexts = [self.prompt + c if len(c) + 1 < K_SAMPLE else None for c in self._rows(g0.shape[0])]
        return _oracle_beams(self.law, contexts, g0, W, L, return_logp, keep_going)


def _oracle_beams(law: _TargetLaw, contexts: list[tuple[int, ...] | None], g0: torch.Tensor, W: int, L: int,
                  return_logp: bool = False, keep_going=None):
    """`beam_search` with the target's exact law as the drafter: the W best beams `[B, W, L]` after g0 `[B]`, row b
    continuing `contexts[b]` (the prompt and the tokens committed before g0; None: a placeholder row)."""
    B = g0.shape[0]
    live = [b for b, c in enumerate(contexts) if c is not None]
    beams, logp = g0[:, None, None].expand(B, W, 1), torch.zeros(B, W, 1)
    score = torch.full((B, W), -1e30)
    score[:, 0] = 0  # as in `beam_search`: the first expansion gives W distinct beams
    for _ in range(L - 1):
        lp = torch.zeros(B, W, SV)
        if live:
            ctx = [contexts[b] + tuple(beams[b, w].tolist()) for b in live for w in range(W)]
            lp[live] = law.logp(ctx).float().view(len(live), W, SV)
        top, idx = (score[:, :, None] + lp).flatten(1).topk(W, dim=-1)
        parent = (idx // SV)[:, :, None]
        beams = torch.cat([beams.gather(1, parent.expand(-1, -1, beams.shape[2])), (idx % SV)[:, :, None]], dim=2)
        logp = torch.cat([logp.gather(1, parent.expand(-1, -1, logp.shape[2])), top[:, :, None]], dim=2)
        score = top
        if keep_going is not None and beams.shape[2] < L and not keep_going(logp):
            break
    return (beams, logp) if return_logp else beams


def _sample_first_tokens(sampler, monkeypatch, n: int, width: int, length: int, adaptive: bool = False,
                         oracle: bool = True) -> tuple[torch.Tensor, list[int]]:
    """n samples `[n, K_SAMPLE]` of ReDrafter's first tokens (batches of 1000 rows) and the accepted drafted tokens
    per step and row still sampling."""
    model, law = sampler
    drafter = new_drafter(model, torch.arange(SV), seed=5)
    g = torch.Generator().manual_seed(123)
    samples, accepted = [], []
    for _ in range(n // 1000):
        with monkeypatch.context() as m:
            replay = _AcceptanceReplay(law, m, oracle)
            samples += redrafter_decode(model, drafter, SAMPLE_PROMPT.expand(1000, -1), K_SAMPLE, beam_width=width,
                                        beam_length=length, temperature=T_SAMPLE, generator=g, adaptive=adaptive)
        accepted += replay.accepted
    return torch.stack(samples), accepted


def _chi_square_pvalue(samples: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's test of samples `[n, k]` against a joint law `[SV**k]`; cells expected < 5 times are pooled. A pool
    of impossible sequences only (a nucleus-cut law) is dropped, and one drawn fails the test outright (p = 0)."""
    counts = torch.bincount(samples @ SV ** torch.arange(samples.shape[1] - 1, -1, -1), minlength=len(law)).double()
    expected = law * len(samples)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


ENGINES = {"oracle tree 4x4": (4, 4), "oracle 1x4 random lengths": (1, 4), "drafter tree 4x4": (4, 4)}


def _random_lengths(monkeypatch) -> list[int]:
    """The adaptive loop (one beam), each step verifying a random length 2..4 (seeded, independent of the draws)."""
    rng, lengths = torch.Generator().manual_seed(3), []
    monkeypatch.setattr(D, "verify_costs", lambda model, max_len: torch.ones(max_len + 1))  # nothing timed
    monkeypatch.setattr(D, "choose_length", lambda cum, live, costs: lengths.append(
        int(torch.randint(2, cum.shape[1] + 1, (1,), generator=rng))) or lengths[-1])
    return lengths


@pytest.mark.parametrize("engine", list(ENGINES))
def test_sampling_is_exact_over_the_first_four_tokens(sampler, monkeypatch, engine):
    _, law = sampler
    joint = law.joint(SAMPLE_PROMPT)
    assert float(joint.max()) < 0.1 and int((joint > 1e-3).sum()) > 60  # a law spread over many sequences
    iid = torch.multinomial(joint.float(), 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    digits = torch.stack([iid // SV ** (K_SAMPLE - 1 - i) % SV for i in range(K_SAMPLE)], dim=1)
    assert _chi_square_pvalue(digits, joint) > 1e-3  # the test accepts draws from the law itself

    adaptive = "random lengths" in engine
    lengths = _random_lengths(monkeypatch) if adaptive else []
    samples, accepted = _sample_first_tokens(sampler, monkeypatch, 8000, *ENGINES[engine], adaptive=adaptive,
                                             oracle=engine.startswith("oracle"))
    assert _chi_square_pvalue(samples, joint) > 1e-3
    deep = torch.bincount(torch.tensor(accepted), minlength=4).double() / len(accepted)  # P(n drafted tokens accepted)
    if engine == "oracle tree 4x4":
        assert float(deep[2:].sum()) > 0.4 and float(deep[3]) > 0.2  # drafted tokens 2 and 3 are often accepted
    elif adaptive:
        assert set(lengths) == {2, 3, 4} and float(deep[2:].sum()) > 0.15
    else:
        assert float(deep[1:].sum()) > 0.3  # with 5 tokens even a random drafter's beams get accepted


def _accept_top2(monkeypatch, M=D) -> None:
    """Acceptance that takes a drafted token whenever it is among the target's two likeliest there, not only when
    it is the target's own draw (the bonus token is still the draw). `M`: the decoding module (D or ED)."""
    pick, pack, unpack = M._pick, M.pack_beams, M.unpack
    seen = {}

    def pick_spy(logits, *args):
        seen["logits"] = logits
        return pick(logits, *args)

    def pack_spy(beams, prefix_tree=None):
        seen["beams"] = beams
        return pack(beams, prefix_tree)

    def lenient_unpack(x, unpacker):
        nxt = unpack(x, unpacker)
        top2 = unpack(seen["logits"].topk(2, dim=-1).indices, unpacker)  # [B, W, L, 2]
        child = seen["beams"][:, :, 1:]
        ok = (top2[:, :, :-1] == child[..., None]).any(dim=-1)
        return torch.cat([torch.where(ok, child, nxt[:, :, :-1]), nxt[:, :, -1:]], dim=2)

    monkeypatch.setattr(M, "_pick", pick_spy)
    monkeypatch.setattr(M, "pack_beams", pack_spy)
    monkeypatch.setattr(M, "unpack", lenient_unpack)


def _dedup_root_only(monkeypatch) -> None:
    """`dedup_prefix` that merges the root only: a prefix shared below it becomes one node per beam, each with its
    own draw, so the longest agreeing beam is picked among independent draws."""
    dedup = TR.dedup_prefix

    def root_only(beams):
        tree = dedup(beams).clone()
        tree[:, :, 1:] = torch.arange(beams.shape[1])[None, :, None]
        return tree

    monkeypatch.setattr(TR, "dedup_prefix", root_only)


@pytest.mark.parametrize(("bug", "engine"), [("accept top-2", "oracle tree 4x4"), ("dedup at the root only", "oracle tree 4x4"),
                                             ("cache gather off by one", "oracle tree 4x4"),
                                             ("cache gather off by one", "oracle 1x4 random lengths")])
def test_exact_sampling_test_catches_a_broken_acceptance(sampler, monkeypatch, bug, engine):
    """Each broken loop keeps the sampler and the drafts as they are and breaks only how drafts are accepted or
    committed; the test above must reject it (its p-value is tiny)."""
    {"accept top-2": _accept_top2, "dedup at the root only": _dedup_root_only,
     "cache gather off by one": lambda m: m.setattr(D, "keep_cache_entries", _keep_off_by_one)}[bug](monkeypatch)
    adaptive = "random lengths" in engine
    if adaptive:
        _random_lengths(monkeypatch)
    samples, _ = _sample_first_tokens(sampler, monkeypatch, 4000, *ENGINES[engine], adaptive=adaptive)
    assert _chi_square_pvalue(samples, sampler[1].joint(SAMPLE_PROMPT)) < 1e-6


# ---- exact sampling on the fast engine -----------------------------------------------------------------------
# The same joint law, sampled by `redrafter_engine_decode` through an `Engine` over its own copy of the sampler's model
# (the engine switches a model to its own attention): the engine's tree verify step, its in-place commit of the
# accepted path, the adaptive length and the nucleus cut all shape the tested law. The engine decodes one sequence
# per call (a step or two each), so the cases take 2000 samples and the controls what rejects them by far.
ENGINE_SAMPLES = 2000
ENGINE_CASES = {"tree 4x4": (4, 4, False, 1.0), "1x4 random lengths": (1, 4, True, 1.0),
                "tree 4x4 top_p 0.8": (4, 4, False, 0.8)}


@pytest.fixture(scope="module")
def engine_sampler():
    model = _sampler_model()
    return Engine(model, None, max_len=64, progress=False), new_drafter(model, torch.arange(SV), seed=5)


def _engine_samples(engine_sampler, law: _TargetLaw, monkeypatch, case: str,
                    n: int = ENGINE_SAMPLES) -> tuple[torch.Tensor, list[int]]:
    """n samples `[n, K_SAMPLE]` of ReDrafter's first tokens on the engine, one call each, and the drafted tokens
    accepted per step. The drafts are `_oracle_beams` after the tokens committed so far, which `on_commit` reports
    before each draft: they depend on committed tokens only, never on the verify step's own draws. The prompt is
    prefilled once: its slots stay as they are (every step writes past them), so each call's prefill only sets
    `filled` and returns the same last hidden state and logits, which the call draws its first token from."""
    engine, drafter = engine_sampler
    width, length, adaptive, top_p = ENGINE_CASES[case]
    out: list[int] = []
    first = engine.prefill(SAMPLE_PROMPT)
    monkeypatch.setattr(engine, "prefill", lambda ids: setattr(engine, "filled", ids.shape[1]) or first)

    def oracle(drafter, h, g0, W, L, return_logp=False, keep_going=None):
        assert out[-1] == int(g0)
        return _oracle_beams(law, [tuple(SAMPLE_PROMPT[0].tolist()) + tuple(out[:-1])], g0, W, L, return_logp,
                             keep_going)

    monkeypatch.setattr(ED, "beam_search", oracle)
    g, stats, samples = torch.Generator().manual_seed(123), SpeculativeStats(), []
    for _ in range(n):
        out.clear()
        samples.append(ED.redrafter_engine_decode(engine, drafter, SAMPLE_PROMPT, K_SAMPLE, width, length, T_SAMPLE,
                                                  generator=g, stats=stats, on_commit=out.extend, adaptive=adaptive,
                                                  top_p=top_p))
    return torch.stack(samples), [int(c) - 1 for c in stats.committed_per_step]


def _random_engine_lengths(monkeypatch) -> list[int]:
    """The adaptive loop, each step verifying a random length 1..4 (seeded, independent of the draws); flat costs
    (nothing timed) let it draft all 4 tokens first."""
    rng, lengths = torch.Generator().manual_seed(3), []
    monkeypatch.setattr(ED, "engine_step_costs", lambda engine, drafter, max_k: torch.ones(max_k + 1))
    monkeypatch.setattr(ED, "best_length", lambda cum, costs: lengths.append(
        int(torch.randint(1, cum.shape[0] + 1, (1,), generator=rng))) or lengths[-1])
    return lengths


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_sampling_is_exact_over_the_first_four_tokens(sampler, engine_sampler, monkeypatch, case):
    top_p = ENGINE_CASES[case][3]
    joint = sampler[1].joint(SAMPLE_PROMPT, top_p=top_p)
    if top_p < 1:  # the cut leaves out most sequences (585 of 625), and a law spread over the rest
        assert int((joint == 0).sum()) > 500 and int((joint > 1e-3).sum()) > 30 and float(joint.max()) < 0.2
    lengths = _random_engine_lengths(monkeypatch) if ENGINE_CASES[case][2] else []
    samples, accepted = _engine_samples(engine_sampler, sampler[1], monkeypatch, case)
    p = _chi_square_pvalue(samples, joint)
    assert p > 1e-3, p
    deep = torch.bincount(torch.tensor(accepted), minlength=4).double() / len(accepted)  # P(n drafted tokens accepted)
    # mean drafted tokens accepted per step: 1.67 (4x4), 0.56 (random lengths, 1..4), 1.94 (4x4, top_p 0.8)
    if lengths:
        assert set(lengths) == {1, 2, 3, 4} and float(deep[2:].sum()) > 0.1, (set(lengths), deep.tolist())
    else:
        assert float(deep[2:].sum()) > 0.4 and float(deep[3]) > 0.2, deep.tolist()  # drafted tokens 2 and 3 often accepted


def _engine_commit_off_by_one(monkeypatch, engine) -> None:
    """`Engine.commit` with an off-by-one in the accepted path's gather: each kept slot takes its left neighbour's K/V."""
    commit = engine.commit
    monkeypatch.setattr(engine, "commit", lambda keep: commit(keep - 1))


def _nucleus_at_the_first_token_only(monkeypatch) -> None:
    """The verify step's draws (logits `[1, N, V]`) forget `top_p`; the first token's (`[1, V]`) keep it."""
    pick = ED._pick
    monkeypatch.setattr(ED, "_pick", lambda logits, t, g, top_p=1.0: pick(logits, t, g, top_p if logits.dim() == 2 else 1.0))


@pytest.mark.parametrize(("bug", "case", "n"), [
    ("accept top-2", "tree 4x4", 500), ("dedup at the root only", "tree 4x4", 2000),
    ("commit off by one", "tree 4x4", 2000), ("commit off by one", "1x4 random lengths", 1000),
    ("nucleus at the first token only", "tree 4x4 top_p 0.8", 500)])
def test_engine_exact_sampling_test_catches_a_broken_acceptance(sampler, engine_sampler, monkeypatch, bug, case, n):
    """Each broken loop keeps the engine, the sampler and the drafts and breaks only how drafts are accepted or
    committed (or the law the verify step draws from); the test above must reject it, each at these n by many orders
    of magnitude below the 1e-6 asked here."""
    {"accept top-2": lambda m: _accept_top2(m, ED), "dedup at the root only": _dedup_root_only,
     "commit off by one": lambda m: _engine_commit_off_by_one(m, engine_sampler[0]),
     "nucleus at the first token only": _nucleus_at_the_first_token_only}[bug](monkeypatch)
    if ENGINE_CASES[case][2]:
        _random_engine_lengths(monkeypatch)
    samples, _ = _engine_samples(engine_sampler, sampler[1], monkeypatch, case, n)
    p = _chi_square_pvalue(samples, sampler[1].joint(SAMPLE_PROMPT, top_p=ENGINE_CASES[case][3]))
    assert p < 1e-6, p


# ---- save / load / errors ------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tiny_llama, context_llama, tmp_path):
    from celeris.models import new_model

    drafter = new_drafter(tiny_llama, torch.arange(0, 96, 2), seed=1)
    drafter.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "drafter.json").read_text())
    assert meta["target"]["vocab_size"] == 96 and meta["draft_vocab_size"] == 48
    back = load_drafter(tmp_path / "d", tiny_llama)
    for (k, a), (_, b) in zip(drafter.state_dict().items(), back.state_dict().items(), strict=True):
        torch.testing.assert_close(a.half().float() if a.is_floating_point() else a, b, msg=k)
    ids = _prompt(0)
    new_drafter(context_llama, torch.arange(0, 96, 2), seed=1).save(tmp_path / "c")  # a loaded drafter decodes exactly
    ref = _varied(decode(context_llama, ids, 12))
    assert torch.equal(redrafter_decode(context_llama, load_drafter(tmp_path / "c", context_llama), ids, 12, beam_width=2,
                                        beam_length=3)[0], ref)

    other = new_model("nano", vocab_size=96, max_position_embeddings=256, seed=7)  # same shape, other weights
    with pytest.raises(CelerisError, match="trained for another model.*output_layer_fingerprint"):
        load_drafter(tmp_path / "d", other)
    for dtype in (torch.bfloat16, torch.float16):  # the same weights in half precision still match
        half = new_model("nano", vocab_size=96, max_position_embeddings=256, seed=0).to(dtype)
        assert load_drafter(tmp_path / "d", half).config.target == drafter.config.target
        with pytest.raises(CelerisError, match="trained for another model"):
            load_drafter(tmp_path / "d", other.to(dtype))
        other.float()
    bigger = new_model("nano", vocab_size=128, max_position_embeddings=256, seed=0)
    with pytest.raises(CelerisError, match="vocab_size 96 vs this model's 128"):
        load_drafter(tmp_path / "d", bigger)
    with pytest.raises(CelerisError, match="not found"):
        load_drafter(tmp_path / "missing", tiny_llama)
    (tmp_path / "d" / "drafter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CelerisError):
        load_drafter(tmp_path / "d", tiny_llama)
    (tmp_path / "d" / "drafter.json").write_text("{broken")
    with pytest.raises(CelerisError):
        load_drafter(tmp_path / "d", tiny_llama)


@pytest.mark.parametrize(("width", "length", "match"), [(0, 4, "beam width"), (65, 4, "beam width"), (4, 1, "beam length"),
                                                         (4, 17, "beam length")])
def test_beam_settings_out_of_range_are_refused(tiny_llama, width, length, match):
    drafter = new_drafter(tiny_llama, torch.arange(96), seed=1)
    with pytest.raises(CelerisError, match=match):
        redrafter_decode(tiny_llama, drafter, _prompt(0), 5, beam_width=width, beam_length=length)


# ---- training ------------------------------------------------------------------------------------
def _tiny_distilled(model, n: int = 24, length: int = 16) -> dict[str, torch.Tensor]:
    """ "Distilled" data from the tiny target itself: greedy continuations and the hidden states behind them."""
    ys, hs = [], []
    with torch.no_grad():
        for s in range(n):
            ids = _prompt(s, 6)
            new = decode(model, ids, length)
            seq = torch.cat([ids[0], new])
            h = model.model(input_ids=seq[None]).last_hidden_state[0]
            hs.append(h[ids.shape[1] - 1 : ids.shape[1] - 1 + length])
            ys.append(new)
    return {"h": torch.stack(hs).half(), "y": torch.stack(ys)}


def test_drafter_training_loss_falls(tiny_llama, tmp_path):
    from celeris.speculative.train import acceptance_metrics, drafter_loss
    from celeris.trainer import TrainConfig, Trainer

    data = _tiny_distilled(tiny_llama)
    train = {k: v[:20] for k, v in data.items()}
    val = {k: v[20:] for k, v in data.items()}
    drafter = new_drafter(tiny_llama, torch.arange(96), seed=0)
    before = acceptance_metrics(drafter, train)
    cfg = TrainConfig(max_steps=150, batch_size=4, lr=5e-3, warmup_steps=10, weight_decay=0.0, eval_every=50,
                      eval_batches=2, progress=False)
    res = Trainer(drafter, train, val, tmp_path, cfg, loss_fn=drafter_loss, export_fn=None).train()
    assert res.steps == 150 and len(res.history) == 3  # validated every 50 steps
    with torch.no_grad():
        first = float(drafter_loss(new_drafter(tiny_llama, torch.arange(96), seed=0), train))
        last = float(drafter_loss(drafter, train))
    assert last < 0.7 * first
    after = acceptance_metrics(drafter, train)
    assert after["top1_per_position"][0] > before["top1_per_position"][0]


def test_kd_term_is_the_kl_to_the_targets_own_distribution(tiny_llama, tmp_path):
    from celeris.speculative.train import DRAFT_STEPS, acceptance_metrics, drafter_loss
    from celeris.trainer import TrainConfig, Trainer

    data = _tiny_distilled(tiny_llama, n=6, length=8)
    data["y"][1, 5:] = -100  # an answer that ended early
    d2t = torch.arange(0, 96, 2)  # half the vocabulary: some greedy tokens cannot be drafted
    drafter = new_drafter(tiny_llama, d2t, seed=1)
    teacher = tiny_llama.lm_head.weight.detach()[d2t]
    with torch.no_grad():
        ce_only = drafter_loss(drafter, data)
        assert torch.equal(drafter_loss(drafter, data, teacher=teacher, kd_weight=0.0), ce_only)
        got = drafter_loss(drafter, data, teacher=teacher, kd_weight=1.0)
        # the same KL written out position by position: step i predicts y[t+i], which the target
        # produced from h[t+i]; the drafter sees h[t] and y[t..t+i-1]
        h, y = data["h"].float(), data["y"]
        B, T = y.shape
        want = 0.0
        for i in range(1, DRAFT_STEPS + 1):
            kls = []
            for b in range(B):
                for t in range(T - i):
                    if y[b, t + i] < 0:
                        continue
                    state = None
                    for j in range(i):
                        state = drafter.rnn_step(state, y[b, t + j].view(1, 1))
                    log_p = drafter(h[b, t].view(1, 1, -1), state).view(-1).log_softmax(-1)
                    log_q = (h[b, t + i] @ teacher.t()).log_softmax(-1)
                    kls.append(float((log_q.exp() * (log_q - log_p)).sum()))
            want += sum(kls) / len(kls)
    assert float(got) == pytest.approx(want, rel=1e-4)
    assert float(got) > 0

    # KD alone teaches the greedy token: with the full vocabulary the target's top-1 is y itself
    data = _tiny_distilled(tiny_llama)
    train, val = {k: v[:20] for k, v in data.items()}, {k: v[20:] for k, v in data.items()}
    drafter = new_drafter(tiny_llama, torch.arange(96), seed=0)
    before = acceptance_metrics(drafter, train)["top1_per_position"][0]
    cfg = TrainConfig(max_steps=100, batch_size=4, lr=5e-3, warmup_steps=10, weight_decay=0.0, eval_every=50,
                      eval_batches=2, progress=False)
    kd = functools.partial(drafter_loss, teacher=tiny_llama.lm_head.weight.detach(), kd_weight=1.0)
    Trainer(drafter, train, val, tmp_path, cfg, loss_fn=kd, export_fn=None).train()
    assert acceptance_metrics(drafter, train)["top1_per_position"][0] > before + 0.2


def test_resume_with_another_kd_weight_is_refused_before_any_work(tmp_path):
    from celeris.speculative.train import train_drafter

    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(CelerisError, match="kd_weight 0, not 1"):  # a run from before the option: CE only
        train_drafter(tmp_path, model=object(), kd_weight=1.0)
    (tmp_path / "objective.json").write_text('{"kd_weight": 0.5}')
    with pytest.raises(CelerisError, match="kd_weight 0.5, not 0"):
        train_drafter(tmp_path, model=object())
    with pytest.raises(CelerisError, match=r"must be in \[0, 1\]"):
        train_drafter(tmp_path, model=object(), kd_weight=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objective.json", "run"]  # nothing written


def test_assistant_sequences_mask_the_prompt_and_padding():
    from celeris.speculative.assistant import assistant_sequences

    data = {"p": torch.tensor([[-100, 5, 6], [7, 8, 9]]), "y": torch.tensor([[1, 2, -100], [3, -100, -100]])}
    s = assistant_sequences(data, pad_id=0)
    assert s["input_ids"].tolist() == [[5, 6, 1, 2], [7, 8, 9, 3]]
    assert s["labels"].tolist() == [[-100, -100, 1, 2], [-100, -100, -100, 3]]
    assert s["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(CelerisError, match="no answers"):
        assistant_sequences({"p": torch.tensor([[1]]), "y": torch.tensor([[-100]])}, pad_id=0)


def test_distilled_assistant_learns_and_keeps_hf_assisted_output_identical(context_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from celeris.speculative.assistant import (
        _masked_lm_loss,
        assistant_sequences,
        new_assistant,
        top1_agreement,
    )
    from celeris.trainer import TrainConfig, Trainer

    # answers follow a rule the untrained model cannot know (each token = previous + 7 mod 96); the random
    # target's own greedy answers are too degenerate (one token repeated) to show learning
    ps = torch.stack([_prompt(s, 6)[0] for s in range(24)])
    ys = (ps[:, -1:] + 7 * torch.arange(1, 17)) % 96
    data = assistant_sequences({"p": ps, "y": ys}, pad_id=0)
    train, val = ({k: v[a:b] for k, v in data.items()} for a, b in ((0, 20), (20, 24)))
    assistant = new_assistant(context_llama, hidden_size=32, num_layers=1, num_heads=2)
    assert assistant.config.vocab_size == context_llama.config.vocab_size
    before = top1_agreement(assistant, train)
    cfg = TrainConfig(max_steps=120, batch_size=4, lr=1e-2, warmup_steps=10, eval_every=60, eval_batches=1, progress=False)
    Trainer(assistant, train, val, tmp_path / "run", cfg, loss_fn=_masked_lm_loss, export_fn=None).train()
    assert before < 0.2 and top1_agreement(assistant, val) > 0.8
    assistant.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = _prompt(99, 6)
    with torch.no_grad():
        plain = context_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assisted = context_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, assistant_model=loaded)
    _varied(plain[0, ids.shape[1]:])
    assert torch.equal(plain, assisted)


def test_distillation_shards_resume_without_regenerating(tmp_path, monkeypatch):
    import celeris.speculative.train as T

    calls = []

    def fake_distill(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True):
        calls.append(len(prompts))
        n = len(prompts)
        return {"h": torch.randn(n, 4, 8).half(), "y": torch.arange(n * 4).view(n, 4),
                "p": torch.full((n, 2 + len(calls)), 7)}  # shards differ in prompt width

    monkeypatch.setattr(T, "distill_data", fake_distill)
    prompts = [f"prompt {i}" for i in range(10)]
    first = T.distill_to_shards(None, None, prompts, tmp_path, "train", 4, 2, shard_prompts=4, progress=False)
    names = [f"train-{T._digest(prompts[k : k + 4])}.safetensors" for k in (0, 4, 8)]  # named by their own prompts
    assert calls == [4, 4, 2] and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert first["p"].shape == (10, 5) and int((first["p"][:4] == -100).sum()) == 4 * 2  # left-padded to the widest
    (tmp_path / names[2]).unlink()  # as if interrupted during the last shard
    again = T.distill_to_shards(None, None, prompts, tmp_path, "train", 4, 2, shard_prompts=4, progress=False)
    assert calls == [4, 4, 2, 2]  # only the missing shard was generated
    assert torch.equal(again["h"][:8], first["h"][:8]) and torch.equal(again["y"], first["y"])
    longer = prompts + [f"prompt {i}" for i in range(10, 15)]  # an extended prompt list reuses the full shards it shares
    more = T.distill_to_shards(None, None, longer, tmp_path, "train", 4, 2, shard_prompts=4, progress=False)
    assert calls == [4, 4, 2, 2, 4, 3] and more["y"].shape[0] == 15
    assert torch.equal(more["h"][:8], first["h"][:8])


def test_stdlib_module_that_fails_to_import_warns_once_and_is_recorded(tiny_llama, tmp_path, monkeypatch):
    """The docstring prompts leave out a module that does not import, warn once, and the distillation
    data's meta.json says which modules were missing (why its prompts differ from another machine's)."""
    import importlib
    import warnings

    import celeris.speculative.prompts as P
    import celeris.speculative.train as T

    real_import = importlib.import_module

    def no_sqlite(name):
        if name == "sqlite3":
            raise ImportError("no _sqlite3 here")
        return real_import(name)

    def fake_distill(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True):
        n = len(prompts)
        return {"h": torch.zeros(n, 2, 64).half(), "y": torch.ones(n, 2, dtype=torch.long), "p": torch.ones(n, 3, dtype=torch.long)}

    assert any(p.startswith("Explain what the Python function `sqlite3.") for p in P.docstring_prompts("train", 5))
    monkeypatch.setattr(P.importlib, "import_module", no_sqlite)
    monkeypatch.setattr(T, "distill_data", fake_distill)
    P._stdlib_module.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompts = P.docstring_prompts("train", 5) + P.docstring_prompts("test", 5)
            T.distillation_data(tiny_llama, None, tmp_path, 2, max_prompts=8, progress=False)
    finally:
        P._stdlib_module.cache_clear()  # the next test imports for real again
    assert not [p for p in prompts if "sqlite3." in p]
    assert [str(w.message).split(" (")[0] for w in caught if "stdlib module" in str(w.message)] == [
        "stdlib module sqlite3 does not import here"]
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["missing_stdlib_modules"] == ["sqlite3"]


def test_distillation_for_other_prompts_never_deletes_existing_shards(tiny_llama, tmp_path, monkeypatch):
    import celeris.speculative.train as T

    def fake_distill(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True):
        n = len(prompts)
        return {"h": torch.zeros(n, 2, 64).half(), "y": torch.ones(n, 2, dtype=torch.long), "p": torch.ones(n, 3, dtype=torch.long)}

    monkeypatch.setattr(T, "distill_data", fake_distill)
    T.distillation_data(tiny_llama, None, tmp_path, 2, max_prompts=8, progress=False)
    first = sorted(p.name for p in (tmp_path / "data").glob("*.safetensors"))
    T.distillation_data(tiny_llama, None, tmp_path, 2, max_prompts=16, progress=False)  # other prompts: new shards
    both = sorted(p.name for p in (tmp_path / "data").glob("*.safetensors"))
    assert set(first) < set(both)
    train, _ = T.distillation_data(tiny_llama, None, tmp_path, 2, max_prompts=16, progress=False, require_existing=True)
    assert len(train["y"]) == 16
    with pytest.raises(CelerisError, match="other prompts"):
        T.distillation_data(tiny_llama, None, tmp_path, 2, max_prompts=24, progress=False, require_existing=True)
    assert sorted(p.name for p in (tmp_path / "data").glob("*.safetensors")) == both


# ---- benchmark inputs ----------------------------------------------------------------------------
def test_prompt_file_errors_name_the_problem(tmp_path):
    from celeris.speculative.bench import load_prompts, parse_configs

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CelerisError, match="is empty"):
        load_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "x"}]}\n{"prompt": oops}\n')
    with pytest.raises(CelerisError, match=":3: not valid JSON"):
        load_prompts(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "hi"}\n')
    with pytest.raises(CelerisError, match=":1: expected"):
        load_prompts(wrong)
    with pytest.raises(CelerisError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    assert len(load_prompts(_write(tmp_path, '{"prompt": "a"}\n\n{"prompt": "b"}\n'))) == 2
    assert parse_configs("1x5,4x3") == [(1, 5, False), (4, 3, False)]
    with pytest.raises(CelerisError, match="bad --configs"):
        parse_configs("4by5")


def _write(tmp_path, text: str):
    p = tmp_path / "ok.jsonl"
    p.write_text(text)
    return p


# ---- the real default model ------------------------------------------------------------------------
def _shipped_drafter(model):
    """The drafter shipped in the package, loaded onto `model`; never replaced by a random one."""
    from celeris.speculative.bench import default_drafter_dir

    d = default_drafter_dir()
    if not (d / "drafter.json").is_file():
        pytest.fail(f"the shipped drafter is missing ({d / 'drafter.json'}): the package is incomplete")
    return load_drafter(d, model)


@pytest.mark.integration
def test_default_model_redrafter_greedy_identical(default_model, monkeypatch):
    """The shipped drafter on SmolLM2: 4 benchmark prompts × 128 tokens, each decoded with `celeris.skinny`'s matmul
    form forced on and forced off (the loop otherwise picks it by timing), give plain greedy's tokens. Two prompts
    run the CPU default (one beam, adaptive length up to 6), two a 2 × 4 tree."""
    import celeris.skinny as sk
    from celeris.generation import encode_prompt, eos_token_ids
    from celeris.speculative.prompts import EVAL_PROMPTS

    model, tok = default_model
    drafter = _shipped_drafter(model)
    eos = eos_token_ids(model, tok)
    asked = []
    for i, prompt in enumerate(EVAL_PROMPTS[j] for j in (0, 2, 5, 7)):  # code, a story, an explanation, a list
        ids = encode_prompt(tok, prompt)
        ref = decode(model, ids, 128, eos_ids=eos)
        assert len(ref) == 128 and len(set(ref.tolist())) > 40, tok.decode(ref)
        width, length, adaptive = (1, 6, True) if i % 2 == 0 else (2, 4, False)
        for skinny in (True, False):
            monkeypatch.setattr(sk, "skinny_helps", lambda m, *a, skinny=skinny, **k: asked.append(skinny) or skinny)
            stats = SpeculativeStats()
            got = redrafter_decode(model, drafter, ids, 128, beam_width=width, beam_length=length, eos_ids=eos,
                                   stats=stats, adaptive=adaptive)[0]
            first = next((k for k, (a, b) in enumerate(zip(got.tolist(), ref.tolist(), strict=False)) if a != b), None)
            assert torch.equal(got, ref), (prompt, f"skinny={skinny}", f"first difference at token {first}")
            assert stats.steps < 120  # drafted tokens were accepted
    assert asked.count(True) == asked.count(False) == 8  # target and drafter, per prompt, in each form


@pytest.mark.integration
def test_generate_with_the_shipped_drafter_uses_the_device_default_beams(default_model):
    """`celeris.generate(..., drafter=DIR)` without beam settings: one beam, adaptive length up to 6 on a CPU, same text as plain."""
    from celeris.api import generate
    from celeris.speculative.bench import default_drafter_dir
    from celeris.speculative.decoding import default_beam_settings

    assert default_beam_settings("cpu") == (1, 6, True) and default_beam_settings("cuda") == (8, 5, False)
    model, tok = default_model
    _shipped_drafter(model)
    plain = generate(model, tok, "Name three primary colours.", max_new_tokens=16)
    fast = generate(model, tok, "Name three primary colours.", max_new_tokens=16, drafter=default_drafter_dir())
    assert (fast.stats["beam_width"], fast.stats["beam_length"], fast.stats["adaptive_length"]) == (1, 6, True)
    assert fast.token_ids == plain.token_ids and fast.stats["steps"] < 16
    fixed = generate(model, tok, "Name three primary colours.", max_new_tokens=16, drafter=default_drafter_dir(), beam_length=4)
    assert (fixed.stats["beam_length"], fixed.stats["adaptive_length"]) == (4, False)
    assert fixed.token_ids == plain.token_ids


# ---- adaptive draft length -----------------------------------------------------------------------
def test_choose_length_maximises_expected_tokens_per_cost():
    from celeris.speculative.decoding import choose_length

    costs = torch.tensor([0.0, 1.0, 1.1, 1.2, 1.6, 1.65])  # index n: a verify of n tokens
    sure = torch.tensor([[1.0, 0.99, 0.98, 0.97, 0.96]]).log()  # cumulative P(drafted 1..j right), column 0 = g0
    unsure = torch.tensor([[1.0, 0.1, 0.01, 0.001, 0.0001]]).log()
    one = torch.ones(1)
    assert choose_length(sure, one, costs) == 5  # 4.90 / 1.65 beats 2.97 / 1.2 and 1.99 / 1.1
    assert choose_length(unsure, one, costs) == 2  # 1.10 / 1.1 beats 1.11 / 1.2
    both = torch.cat([sure, unsure])
    assert choose_length(both, torch.tensor([0.0, 1.0]), costs) == 2  # a finished row has no say
    assert choose_length(both, torch.tensor([1.0, 0.0]), costs) == 5


def test_drafting_stops_once_no_longer_draft_can_pay():
    from celeris.speculative.decoding import worth_drafting_on

    costs = torch.tensor([0.0, 1.0, 1.1, 1.2, 1.6, 1.65])
    one = torch.ones(1)
    assert worth_drafting_on(torch.tensor([[1.0, 0.99]]).log(), one, costs, 5)  # 5 tokens may reach 4.96 / 1.65
    assert not worth_drafting_on(torch.tensor([[1.0, 0.05]]).log(), one, costs, 5)  # at most 1.2 / 1.65 < 1.05 / 1.1
    assert not worth_drafting_on(torch.tensor([[1.0, 0.99, 0.98, 0.97, 0.96]]).log(), one, costs, 5)  # at L already
    # the bound is exact enough: a draft that is still sure at depth 3 goes on to 4
    assert worth_drafting_on(torch.tensor([[1.0, 0.99, 0.98, 0.97]]).log(), one, costs, 5)


@pytest.mark.parametrize("forced", [2, 5])
def test_adaptive_length_keeps_greedy_output_and_follows_the_costs(context_llama, monkeypatch, forced):
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    # falling costs: the longest draft always has the most expected tokens per cost; steep: the shortest
    costs = torch.tensor([0.0, 1.0] + ([1.0, 0.9, 0.8, 0.7] if forced == 5 else [1.0, 100.0, 100.0, 100.0]))
    monkeypatch.setattr(D, "verify_costs", lambda model, max_len: costs)
    for seed in range(3):
        ids = _prompt(seed)
        ref = _varied(decode(context_llama, ids, 30))
        st = SpeculativeStats()
        got = redrafter_decode(context_llama, drafter, ids, 30, beam_width=1, beam_length=5, stats=st, adaptive=True)[0]
        assert torch.equal(got, ref)
        assert st.unpacked_tokens == st.steps * forced


def test_adaptive_lengths_that_vary_every_step_keep_batches_and_eos_exact(context_llama, monkeypatch):
    """Whatever length each step verifies, a left-padded batch with an EOS decodes exactly as plain greedy."""
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    monkeypatch.setattr(D, "verify_costs", lambda model, max_len: torch.ones(max_len + 1))
    rng = torch.Generator().manual_seed(7)
    chosen = []

    def random_length(cum, live, costs):
        chosen.append(int(torch.randint(2, cum.shape[1] + 1, (1,), generator=rng)) if cum.shape[1] > 2 else 2)
        return chosen[-1]

    monkeypatch.setattr(D, "choose_length", random_length)
    monkeypatch.setattr(D, "worth_drafting_on", lambda *a: True)  # draft the full length, then cut at random
    prompts = [_prompt(s, n)[0] for s, n in [(0, 6), (1, 11), (2, 9)]]
    eos = [int(_varied(decode(context_llama, prompts[1][None], 30))[12])]
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    got = redrafter_decode(context_llama, drafter, ids, 30, beam_width=1, beam_length=6, attention_mask=mask, eos_ids=eos,
                           adaptive=True)
    for p, g in zip(prompts, got, strict=True):
        assert torch.equal(g, _varied(decode(context_llama, p[None], 30, eos_ids=eos)))
    assert len(set(chosen)) >= 4  # the lengths really varied (2..6)


def test_adaptive_lengths_with_long_accepted_runs(context_llama, monkeypatch):
    """Oracle drafts (long accepted runs, deep cache gathers) cut at a random verified length every step."""
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    monkeypatch.setattr(D, "verify_costs", lambda model, max_len: torch.ones(max_len + 1))
    rng = torch.Generator().manual_seed(11)
    monkeypatch.setattr(D, "choose_length", lambda cum, live, costs: int(torch.randint(2, cum.shape[1] + 1, (1,), generator=rng)))
    for seed in range(3):
        ids = _prompt(seed)
        ref = _varied(decode(context_llama, ids, 40))
        search, state = _oracle_beam_search(torch.cat([ids[0], ref]), ids.shape[1], seed)
        keep = D.keep_cache_entries

        def oracle(drafter, h, g0, W, L, return_logp=False, keep_going=None, search=search):
            beams = search(drafter, h, g0, W, L)
            return (beams, torch.zeros(beams.shape)) if return_logp else beams

        def tracking_keep(cache, past_len, path, keep=keep, state=state):
            keep(cache, past_len, path)
            state["pos"] = cache.layers[0].keys.shape[2]

        monkeypatch.setattr(D, "beam_search", oracle)
        monkeypatch.setattr(D, "keep_cache_entries", tracking_keep)
        stats = SpeculativeStats()
        got = D.redrafter_decode(context_llama, drafter, ids, 40, beam_width=1, beam_length=6, stats=stats, adaptive=True)[0]
        monkeypatch.setattr(D, "keep_cache_entries", keep)
        assert torch.equal(got, ref)
        assert stats.tokens_per_step > 1.5  # drafted tokens were accepted, at varying depths
        assert stats.packed_tokens < stats.steps * 6  # and not every step verified the full draft


def test_verify_costs_are_measured_once_per_machine_and_adaptive_needs_one_beam(tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "verify_costs.json"  # where the autouse fixture points the table
    path.write_text(json.dumps({"another machine": [0, 1, 2]}))
    monkeypatch.setattr(D, "_COSTS", {})
    c = D.verify_costs(tiny_llama, 4)
    assert c.shape == (5,) and bool((c[1:] > 0).all())
    assert D.verify_costs(tiny_llama, 4) is c  # kept for the process
    saved = json.loads(path.read_text())
    key = D._costs_key(tiny_llama, 4)
    assert saved == {"another machine": [0, 1, 2], key: [round(float(x), 4) for x in c]}  # other entries kept
    # a new process reads the table back instead of timing forwards again
    real_forward = D._target_forward
    monkeypatch.setattr(D, "_COSTS", {})
    monkeypatch.setattr(D, "_target_forward", lambda *a: pytest.fail("measured again"))
    assert torch.allclose(D.verify_costs(tiny_llama, 4), c, atol=1e-4)
    # damaged files and entries are measured over, never trusted and never a crash
    monkeypatch.setattr(D, "_target_forward", real_forward)
    for text in ("{not json", "[1, 2]", "[" * 100_000, json.dumps({key: "12345"}), json.dumps({key: [0, 1, -1, 2, 3]}),
                 json.dumps({key: [0, 1, 10**400, 2, 3]}), json.dumps({key: [0, 1, None, 2, 3]})):
        path.write_text(text)
        monkeypatch.setattr(D, "_COSTS", {})
        fresh = D.verify_costs(tiny_llama, 4)
        assert fresh.shape == (5,) and bool((fresh[1:] > 0).all()) and bool(torch.isfinite(fresh).all())
        assert json.loads(path.read_text())[key] == [round(float(x), 4) for x in fresh]
    drafter = new_drafter(tiny_llama, torch.arange(96), seed=1)
    with pytest.raises(CelerisError, match="one beam"):
        redrafter_decode(tiny_llama, drafter, _prompt(0), 5, beam_width=2, beam_length=4, adaptive=True)
    from celeris.speculative.bench import parse_configs

    assert parse_configs("1x6a,2x3") == [(1, 6, True), (2, 3, False)]
    with pytest.raises(CelerisError, match="beam width 1"):
        parse_configs("2x6a")


def test_skinny_linear_matches_f_linear_and_is_removed_afterwards():
    """`(W @ xᵀ)ᵀ` for 2..max_rows rows equals F.linear to float rounding; other inputs take F.linear itself."""
    import torch.nn.functional as F

    from celeris.skinny import skinny_linear

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Linear(96, 40, bias=False))
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))  # hooks still run
    xs = {n: torch.randn(1, n, 48) for n in (1, 2, 5, 16, 17)}
    ref = {n: F.linear(F.linear(x, net[0].weight, net[0].bias), net[1].weight) for n, x in xs.items()}
    with skinny_linear(net, max_rows=16):
        assert all("forward" in m.__dict__ for m in net)
        got = {n: net(x) for n, x in xs.items()}
        batched = net(torch.randn(2, 3, 48))  # 6 rows over two batch dims
    assert all("forward" not in m.__dict__ for m in net)
    for n in xs:
        assert got[n].shape == ref[n].shape
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[17], ref[17])  # outside 2..16: F.linear itself
    assert batched.shape == (2, 3, 40) and len(calls) == 6


def test_skinny_auto_follows_the_measured_choice_and_keeps_the_math(monkeypatch):
    """`auto=True` patches the layers exactly when `skinny_helps` says the form is faster; the result agrees either way."""
    import celeris.skinny as sk

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Linear(96, 40, bias=False))
    x = torch.randn(1, 5, 48)
    ref = net(x)
    # The verdict follows the timings of the largest layer's weight ([96, 48]), measured here on a fake clock:
    # each form advances it by a set cost, so which form is faster is known.
    clock, timed = [0.0], []
    real_mm, real_linear = torch.mm, torch.nn.functional.linear

    def costs(mm: float, linear: float):
        def fake_mm(w, xt):
            clock[0] += mm
            timed.append(tuple(w.shape))
            return real_mm(w, xt)

        def fake_linear(x, w, *a):
            clock[0] += linear
            return real_linear(x, w, *a)

        monkeypatch.setattr(sk, "_HELPS", {})
        monkeypatch.setattr(sk.time, "perf_counter", lambda: clock[0])
        monkeypatch.setattr(sk.torch, "mm", fake_mm)
        monkeypatch.setattr(sk.F, "linear", fake_linear)

    costs(mm=1.0, linear=2.0)
    assert sk.skinny_helps(net) is True and set(timed) == {(96, 48)}
    costs(mm=2.0, linear=1.0)
    assert sk.skinny_helps(net) is False
    monkeypatch.undo()
    assert sk.skinny_helps(torch.nn.Sequential(torch.nn.ReLU())) is False  # nothing to time
    for verdict in (True, False):
        monkeypatch.setattr(sk, "skinny_helps", lambda model, verdict=verdict: verdict)
        with sk.skinny_linear(net, auto=True):
            assert all(("forward" in m.__dict__) is verdict for m in net)
            torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        assert all("forward" not in m.__dict__ for m in net)


def test_gqa_sdpa_gives_hf_sdpa_outputs_with_padding_and_tree_masks(tiny_llama):
    """The K/V-sharing attention is the same math as HF's `sdpa` (which repeats K/V under a mask)."""
    from celeris.attention import NAME, gqa_sdpa

    assert tiny_llama.config._attn_implementation == "sdpa"
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads
    ids = torch.randint(0, 96, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :7] = 0
    tree = torch.zeros(3, 1, 5, 17)
    tree[..., 12:] = torch.finfo(torch.float32).min
    tree[..., 12:] = tree[..., 12:].triu(1)  # a chain over 5 new tokens, all past slots visible
    with torch.no_grad():
        ref = tiny_llama(ids, attention_mask=mask).logits
        with gqa_sdpa(tiny_llama):
            assert tiny_llama.config._attn_implementation == NAME
            got = tiny_llama(ids, attention_mask=mask).logits
        assert tiny_llama.config._attn_implementation == "sdpa"
        real = mask.bool()
        assert torch.allclose(got[real], ref[real], atol=1e-5)
        full = torch.cat([ids, torch.randint(0, 96, (3, 5))], 1)
        pos = torch.arange(17).expand(3, 17)
        from transformers import DynamicCache

        outs = []
        for fast in (False, True):
            cache = DynamicCache(config=tiny_llama.config)
            tiny_llama(full[:, :12], past_key_values=cache, use_cache=True)
            tree4 = tree.clone()
            tree4[..., :12] = 0
            ctx = gqa_sdpa(tiny_llama) if fast else contextlib.nullcontext()
            with ctx:
                outs.append(tiny_llama(full[:, 12:], attention_mask=tree4, position_ids=pos[:, 12:], past_key_values=cache).logits)
        assert torch.allclose(outs[0], outs[1], atol=1e-5)


class _ByteTokenizer:
    """Enough of a tokenizer for the benchmark on a 96-token model: one id per character."""

    chat_template = None
    eos_token_id = 95  # HF prompt lookup needs one
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        return {"input_ids": torch.tensor([[ord(c) % 96 for c in text]])}


def test_benchmark_interleaves_engines_and_reports_each(context_llama):
    from celeris.speculative.bench import format_table, not_identical, run_speculative_benchmark

    drafter = new_drafter(context_llama, torch.arange(96), seed=0)
    rows = [{"prompt": "abc def ghi"}, {"prompt": "the cat sat on the mat"}, {"prompt": "xyz"}]
    res = run_speculative_benchmark(context_llama, _ByteTokenizer(), rows, drafter, [(1, 3), (3, 3)], max_new_tokens=9,
                                    repeats=2, progress=False)
    by = {e["name"]: e for e in res["engines"]}
    assert list(by) == ["hf-generate", "hf-prompt-lookup", "hf-prompt-lookup+skinny", "celeris-plain", "redrafter-w1-l3",
                        "redrafter-w3-l3"]
    assert "hf-assisted" in res["skipped"]
    # the skinny matmul form changes float rounding only: HF prompt lookup makes the same steps either way
    assert by["hf-prompt-lookup+skinny"]["tokens_per_step"] == pytest.approx(by["hf-prompt-lookup"]["tokens_per_step"])
    for name in ("hf-generate", "celeris-plain", "redrafter-w1-l3", "redrafter-w3-l3"):
        assert by[name]["identical_to_greedy"], name
    assert not_identical(res) == []
    for ids in (_ByteTokenizer()(r["prompt"])["input_ids"] for r in rows):  # the references vary
        _varied(decode(context_llama, ids, 9))
    for e in res["engines"]:
        t = e["tokens_per_second"]
        assert len(t["runs"]) == 2 and min(t["runs"]) == t["min"] > 0 and max(t["runs"]) == t["max"]
        assert t["median"] == pytest.approx(statistics.median(t["runs"]))
    assert by["redrafter-w3-l3"]["new_tokens_per_repeat"] == by["hf-generate"]["new_tokens_per_repeat"] > 3
    assert by["hf-generate"]["tokens_per_step"] == pytest.approx(1.0)  # one token per target forward
    base, plain = by["hf-generate"]["tokens_per_second"]["runs"], by["celeris-plain"]["tokens_per_second"]["runs"]
    for e in res["engines"]:  # each ratio repeat by repeat (the engines ran in the same passes), then its median
        runs = e["tokens_per_second"]["runs"]
        assert e["speedup"]["runs"] == pytest.approx([a / b for a, b in zip(runs, base, strict=True)]), e["name"]
        assert e["vs_celeris_plain"]["runs"] == pytest.approx([a / b for a, b in zip(runs, plain, strict=True)]), e["name"]
        assert e["speedup"]["median"] == pytest.approx(statistics.median(e["speedup"]["runs"]))
    assert by["hf-generate"]["speedup"]["median"] == pytest.approx(1.0)
    env = res["environment"]
    assert {"commit", "dirty", "cpu", "cores", "threads", "torch", "transformers", "python", "artifacts"} <= set(env)
    assert env["artifacts"]["model"]["path"]  # the tiny model is built in memory: named, no file to hash
    assert res["settings"]["repeats"] == 2
    w3 = by["redrafter-w3-l3"]
    assert 1.0 <= w3["tokens_per_step"] <= 3.0 and w3["packed_tokens"] <= w3["unpacked_tokens"]
    assert "redrafter-w3-l3" in format_table(res)
    assert res["settings"]["device"] == "cpu" and res["settings"]["dtype"] == "float32"


def test_bench_speculative_exits_nonzero_when_a_greedy_engine_is_not_identical(context_llama, tmp_path, monkeypatch,
                                                                                capsys):
    """`celeris bench speculative` on a tiny model: status 0 when every guaranteed engine matches plain greedy, 1 (after
    writing its JSON) when a deliberately broken ReDrafter loop does not."""
    import celeris.models
    import celeris.speculative.drafter
    from celeris.cli import main

    monkeypatch.setattr(celeris.models, "load_model", lambda *a, **k: (context_llama, _ByteTokenizer()))
    monkeypatch.setattr(celeris.speculative.drafter, "load_drafter", lambda d, m: new_drafter(m, torch.arange(96), seed=0))
    prompts = _write(tmp_path, '{"prompt": "the cat sat on the mat"}\n{"prompt": "xyz"}\n')
    args = ["bench", "speculative", "--prompts", str(prompts), "-n", "10", "--configs", "1x3,2x3", "--repeats", "1",
            "--engines", "redrafter-w1-l3,redrafter-w2-l3", "--json"]
    main([*args, str(tmp_path / "ok.json")])  # returns: nothing to report
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert [e["name"] for e in ok["engines"]] == ["hf-generate", "celeris-plain", "redrafter-w1-l3", "redrafter-w2-l3"]
    assert [e["identical_to_greedy"] for e in ok["engines"]] == [True] * 4  # both plain baselines run whatever --engines says
    assert ok["environment"]["artifacts"]["prompts"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert ok["settings"]["prompt_source"] == f"the prompt file {prompts}"
    capsys.readouterr()

    monkeypatch.setattr(D, "keep_cache_entries", _keep_off_by_one)
    with pytest.raises(SystemExit) as exc:
        main([*args, str(tmp_path / "bad.json")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error: not identical to plain greedy decoding: redrafter-w1-l3, redrafter-w2-l3" in err
    bad = {e["name"]: e["identical_to_greedy"] for e in json.loads((tmp_path / "bad.json").read_text())["engines"]}
    assert bad == {"hf-generate": True, "celeris-plain": True, "redrafter-w1-l3": False, "redrafter-w2-l3": False}


def test_training_validation_and_benchmark_prompts_are_disjoint():
    from celeris.speculative import prompts as P

    train, val, bench = P.training_prompts(), P.evaluation_prompts(), list(P.EVAL_PROMPTS)
    assert len(set(train)) == len(train) and not set(train) & set(val) and not set(train) & set(bench)
    assert not set(val) & set(bench)
    # the wider prompts come last, so the shards of a run made from the earlier list stay valid
    assert train[: len(train) - len(P.wider_prompts())] == P.everyday_prompts() + P.docstring_prompts("train", 2)
    subjects = " ".join(bench + list(P.VALIDATION_PROMPTS) + list(P.VALIDATION_TOPICS)).lower()
    assert not [t for t in P.TOPICS + P.MORE_TOPICS + P.NEW_TOPICS if t.lower() in subjects]
    assert len(P.training_prompts(100)) == 100
