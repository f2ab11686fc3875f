"""ReDrafter under a memory policy on the engine (celeris.compose): the same tokens as plain decoding under the
same policy, evictions at the same token counts."""

from __future__ import annotations

import pytest
import torch

import celeris.compose as C
import celeris.speculative.engine_decoding as ED
from celeris.engine import Engine
from celeris.memory import parse_budget, run_with_memory
from celeris.memory.policies import H2O, NAMM, FullCache, L2Norm, NammConfig, StreamingLLM
from celeris.speculative import new_drafter


def _engine(model):
    return Engine(model, None, max_len=512)


def _oracle(truth: torch.Tensor, engine_seen, seed: int):
    """The real drafter runs, then its beam follows `truth` from the current position (cut at a random depth)."""
    g = torch.Generator().manual_seed(seed)
    real = ED.beam_search

    def search(drafter, h, g0, W, L, **kw):
        beams, cum = real(drafter, h, g0, W, L, return_logp=True)
        pos = engine_seen()
        k = int(torch.randint(1, L + 1, (1,), generator=g))
        cont = truth[pos : pos + L]
        beams[0, 0, 1 : min(k, cont.numel())] = cont[1 : min(k, cont.numel())]
        cum[:] = 0.0  # sure of every token: the longest length is verified
        return (beams, cum) if kw.get("return_logp") else beams

    return search


def _session_seen(monkeypatch):
    """The token count of the session the composed loop is running (read by the oracle)."""
    box = {}
    orig = C.MemorySession

    class Spy(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            box["s"] = self

    monkeypatch.setattr(C, "MemorySession", Spy)
    return lambda: box["s"].seen


POLICIES = [(FullCache(), None), (StreamingLLM(), "0.3"), (L2Norm(), "0.3"), (H2O(recent=8), "0.3"),
            (NAMM(cfg=NammConfig(n_up=32)), "0.3")]


@pytest.mark.parametrize("policy,budget", POLICIES, ids=lambda p: getattr(p, "name", str(p)))
def test_drafting_under_a_policy_equals_plain_decoding_under_it(context_llama, monkeypatch, policy, budget):
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    b = parse_budget(budget)
    first = run_with_memory(_engine(context_llama), ids, policy, b, n_up=32, max_new_tokens=90)
    assert len(set(first.new_ids)) >= 8
    monkeypatch.setattr(ED, "beam_search", _oracle(torch.cat([ids[0], torch.tensor(first.new_ids)]), _session_seen(monkeypatch), 0))
    got = C.redrafter_with_memory(_engine(context_llama), drafter, ids, policy, b, 90, beam_length=5, adaptive=False,
                                  n_up=32, keep_cache=True)
    schedule = got.extra["eviction_schedule"]
    ref = run_with_memory(_engine(context_llama), ids, policy, b, n_up=32, max_new_tokens=90, keep_cache=True)
    assert schedule == ref.extra["eviction_schedule"] == list(range(32, 150 + 90 - 1, 32))
    assert got.extra["speculative"]["tokens_per_step"] > 1.5  # several tokens committed per step
    assert got.new_ids == ref.new_ids
    assert all(torch.equal(p, q) for p, q in zip(got.positions, ref.positions, strict=True))
    if budget is not None:
        assert got.kept_fraction < 0.6
    else:  # keep-everything: drafting alone
        from celeris.generation import engine_decode

        assert got.new_ids == engine_decode(_engine(context_llama), ids, 90).tolist()


def test_accepted_rows_only_reach_an_attention_policy(context_llama, monkeypatch):
    """Negative control: handing H2O the rows of every tree node (rejected ones too, columns unmoved) changes what
    it keeps, so the equality above rests on `_keep_accepted_rows`."""
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    b = parse_budget("0.3")
    first = run_with_memory(_engine(context_llama), ids, H2O(recent=8), b, n_up=32, max_new_tokens=90)
    monkeypatch.setattr(ED, "beam_search", _oracle(torch.cat([ids[0], torch.tensor(first.new_ids)]), _session_seen(monkeypatch), 0))
    monkeypatch.setattr(C, "_keep_accepted_rows", lambda *a: None)
    got = C.redrafter_with_memory(_engine(context_llama), drafter, ids, H2O(recent=8), b, 90, beam_length=5,
                                  adaptive=False, n_up=32, keep_cache=True)
    ref = run_with_memory(_engine(context_llama), ids, H2O(recent=8), b, n_up=32, max_new_tokens=90,
                          evict_at=got.extra["eviction_schedule"], keep_cache=True)
    assert not all(torch.equal(p, q) for p, q in zip(got.positions, ref.positions, strict=True))
