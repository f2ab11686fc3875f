"""Tests for celeris.memory: runner, policies, NAMM features, task suite, kvpress peer, evolution."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from celeris.errors import CelerisError
from celeris.generation import decode
from celeris.memory import make_policy, parse_budget, run_with_memory
from celeris.memory.policies import H2O, NAMM, FullCache, L2Norm, NammConfig, RandomPolicy, StreamingLLM
from celeris.memory.policies.namm import (
    attention_spectrogram,
    backward_mask,
    bam_scores,
    ema_of_attention,
    ema_spectrogram,
    unflatten_params,
)
from celeris.memory.tasks import KINDS, alpha_rename, load_tasks, make_tasks, score_answer


def _count(s: str) -> int:
    return len(s) // 4


@pytest.fixture
def varied_llama():
    """A random nano Llama whose greedy output is not a constant token (larger init)."""
    from celeris.models import new_model

    m = new_model("nano", vocab_size=96, max_position_embeddings=512, seed=1, initializer_range=0.3).eval()
    return m


# ----------------------------------------------------------------------------- runner
@pytest.mark.parametrize("policy,budget", [(FullCache(), None), (FullCache(), "0.1"), (NAMM(cfg=NammConfig(n_up=32)), None),
                                           (L2Norm(), "1.0")])
def test_keep_everything_policy_gives_same_output_as_no_policy(context_llama, policy, budget):
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    ref = decode(context_llama, ids, 40).tolist()
    assert len(set(ref)) >= 8  # the check is meaningful only if the output varies
    r = run_with_memory(context_llama, ids, policy, parse_budget(budget), n_up=32, max_new_tokens=40)
    assert r.new_ids == ref
    assert r.kept_fraction == 1.0 and r.peak_kv_bytes == r.full_peak_kv_bytes


# ----------------------------------------------------------------------------- the runner on the engine
def _engine(model):
    from celeris.engine import Engine

    return Engine(model, None, max_len=512)


@pytest.mark.parametrize("policy,budget", [(FullCache(), None), (NAMM(cfg=NammConfig(n_up=32)), None)])
def test_keep_everything_on_the_engine_equals_plain_engine_decoding(context_llama, policy, budget):
    from celeris.generation import engine_decode

    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    ref = engine_decode(_engine(context_llama), ids, 40).tolist()
    assert len(set(ref)) >= 8
    r = run_with_memory(_engine(context_llama), ids, policy, parse_budget(budget), n_up=32, max_new_tokens=40)
    assert r.new_ids == ref and r.kept_fraction == 1.0


@pytest.mark.parametrize("policy", [StreamingLLM(), L2Norm(), H2O(recent=8),
                                    NAMM(cfg=NammConfig(n_up=32))], ids=lambda p: p.name)
def test_policies_on_the_engine_keep_what_they_keep_on_the_hf_model(varied_llama, policy):
    """The engine's compacted static cache and the HF runner's rebuilt DynamicCache keep the same positions per
    layer and head and give the same answer (an fp32 model: the two attention forms agree to rounding)."""
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(7))
    hf = run_with_memory(varied_llama, ids, policy, parse_budget("0.3"), n_up=32, max_new_tokens=30, keep_cache=True)
    eng = run_with_memory(_engine(varied_llama), ids, policy, parse_budget("0.3"), n_up=32, max_new_tokens=30,
                          keep_cache=True)
    assert hf.evictions == eng.evictions >= 4
    assert all(torch.equal(a, b) for a, b in zip(hf.positions, eng.positions, strict=True))
    assert eng.new_ids == hf.new_ids
    assert eng.extra["peak_held_kv_bytes"] == hf.peak_kv_bytes  # the same tokens held (fp32 both)


def test_engine_compaction_keeps_each_heads_kept_keys(varied_llama):
    """After evictions, slot j of head h holds the key of the position the runner recorded there; a compaction
    that ignores the per-head order (the negative control) does not."""
    import celeris.memory.runner as R

    ids = torch.randint(0, 96, (1, 130), generator=torch.Generator().manual_seed(4))
    full = run_with_memory(_engine(varied_llama), ids, FullCache(), None, n_up=32, max_new_tokens=1, keep_cache=True)
    engine = _engine(varied_llama)
    ev = run_with_memory(engine, ids, L2Norm(), parse_budget("0.3"), n_up=32, max_new_tokens=1, keep_cache=True)
    assert ev.evictions >= 3
    ref = _engine(varied_llama)
    ref.prefill(ids)
    k_full = ref.cache.layers[0].keys[0, :, :130]
    pos = ev.positions[0]
    got = engine.cache.layers[0].keys[0, :, : pos.shape[1]]
    want = k_full.gather(1, pos[..., None].expand(-1, -1, k_full.shape[-1]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert full.kept_fraction == 1.0

    class Shared(R._EngineCache):  # negative control: every head keeps head 0's slots
        def keep(self, layer, idx):
            super().keep(layer, idx[:1].expand_as(idx))

    bad = _engine(varied_llama)
    orig = R._EngineCache
    R._EngineCache = Shared
    try:
        bev = run_with_memory(bad, ids, L2Norm(), parse_budget("0.3"), n_up=32, max_new_tokens=1, keep_cache=True)
    finally:
        R._EngineCache = orig
    bgot = bad.cache.layers[0].keys[0, :, : bev.positions[0].shape[1]]
    assert not torch.allclose(bgot, k_full.gather(1, bev.positions[0][..., None].expand(-1, -1, k_full.shape[-1])))


def test_eviction_keeps_absolute_rope_positions(varied_llama):
    """Layer-0 keys depend only on the token and its absolute position: after evictions (prefill and
    decoding) every kept key must equal the full run's key at the recorded position."""
    ids = torch.randint(0, 96, (1, 130), generator=torch.Generator().manual_seed(4))
    full = run_with_memory(varied_llama, ids, FullCache(), None, n_up=32, max_new_tokens=30, keep_cache=True)
    ev = run_with_memory(varied_llama, ids, L2Norm(), parse_budget("0.3"), n_up=32, max_new_tokens=30, keep_cache=True)
    assert ev.evictions >= 4
    k_full = full.cache.layers[0].keys[0]  # [H, T, D], positions 0..T-1
    k_ev, pos = ev.cache.layers[0].keys[0], ev.positions[0]
    assert pos.shape[1] < k_full.shape[1]
    assert torch.all(pos[:, 1:] > pos[:, :-1])  # kept in order, oldest first
    want = k_full.gather(1, pos[..., None].expand(-1, -1, k_full.shape[-1]))
    # Keys of prompt tokens fed after the first eviction came from a different forward: equal only if
    # the explicit absolute position_ids were right (generated tokens may differ between the runs).
    prompt = pos < 130
    assert (prompt & (pos >= 64)).any()
    torch.testing.assert_close(k_ev[prompt], want[prompt], atol=1e-5, rtol=1e-4)


def test_physical_bytes_shrink_as_reported(varied_llama):
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(5))
    r = run_with_memory(varied_llama, ids, StreamingLLM(), parse_budget("0.25"), n_up=32, max_new_tokens=10,
                        keep_cache=True)
    cfg = varied_llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # fp32 K and V
    seen = 200 + 9  # the last generated token is never fed
    kept = math.ceil(0.25 * 192) + (seen - 192)  # last eviction at 192 tokens
    assert r.end_kv_bytes == per_token * kept == sum(t.numel() * 4 for layer in r.cache.layers for t in (layer.keys, layer.values))
    assert r.full_peak_kv_bytes == per_token * seen
    assert r.kv_bytes_ratio == pytest.approx(r.peak_kv_bytes / (per_token * seen))
    assert r.kv_bytes_ratio < 0.5
    assert r.kept_fraction == pytest.approx(kept / seen)


def test_token_count_budget_caps_the_cache(varied_llama):
    ids = torch.randint(0, 96, (1, 160), generator=torch.Generator().manual_seed(6))
    r = run_with_memory(varied_llama, ids, H2O(recent=8), parse_budget("40"), n_up=32, max_new_tokens=1, keep_cache=True)
    assert r.cache.layers[0].keys.shape[2] == 40


# ----------------------------------------------------------------------------- scoring rules
ATT = torch.tensor([[[0.5, 0.5, 0.0, 0.0],
                     [0.1, 0.2, 0.7, 0.0],
                     [0.6, 0.1, 0.1, 0.2]]])  # [H=1, Q=3, N=4]


def test_h2o_accumulates_attention_and_keeps_recent():
    h2o, state = H2O(recent=1), {}
    pos = torch.arange(4)[None]
    s = h2o.score(0, torch.zeros(1, 4, 2), None, ATT, pos, state)
    assert torch.allclose(s[0, :3], torch.tensor([1.2, 0.8, 0.8]))
    assert math.isinf(s[0, 3])
    # accumulation survives the next update (a new token appended)
    s2 = h2o.score(0, torch.zeros(1, 5, 2), None, torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0]]]), torch.arange(5)[None], state)
    assert torch.allclose(s2[0, :3], torch.tensor([1.2, 1.8, 0.8]))


def test_l2_keeps_low_norm_keys():
    keys = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]]])
    s = L2Norm().score(0, keys, keys, None, torch.arange(3)[None], {})
    assert torch.allclose(s, torch.tensor([[-5.0, -1.0, -math.sqrt(2)]]))
    assert s.topk(1).indices.item() == 1


def test_streaming_llm_keeps_sinks_and_recent():
    s = StreamingLLM(n_sink=2).score(0, torch.zeros(1, 6, 2), None, None, torch.tensor([[0, 1, 5, 6, 7, 9]]), {})
    assert s.topk(4).indices.sort().values.tolist() == [[0, 1, 4, 5]]


def test_random_is_seeded_and_full_keeps_all():
    r = RandomPolicy()
    r.reset(1)
    a = r.score(0, torch.zeros(2, 8, 2), None, None, None, {})
    r.reset(1)
    assert torch.equal(a, r.score(0, torch.zeros(2, 8, 2), None, None, None, {}))
    r.reset(2)
    assert not torch.equal(a, r.score(0, torch.zeros(2, 8, 2), None, None, None, {}))
    assert torch.all(FullCache().score(0, torch.zeros(2, 8, 2), None, None, None, {}) == 0)


# ----------------------------------------------------------------------------- NAMM
def test_namm_has_4172_parameters():
    assert NammConfig().n_params == 4172 and NammConfig().d_in == 25


def test_stft_and_ema_match_direct_numpy():
    cfg = NammConfig(n_up=64)
    g = torch.Generator().manual_seed(0)
    att = torch.rand(2, 64, 5, generator=g)
    tail = torch.rand(2, 5, 16, generator=g)
    old = torch.rand(2, 5, 17, generator=g)
    spec, new_tail = attention_spectrogram(att, tail, cfg)
    first = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]])
    ema = ema_spectrogram(spec, old, first, 64, cfg)
    n = np.arange(32)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * n / 32)  # periodic Hann
    a = 0.99 ** 16
    for h in range(2):
        for i in range(5):
            x = np.concatenate([tail[h, i].numpy(), att[h, :, i].numpy()]).astype(np.float64)
            frames = [np.abs(np.fft.rfft(x[16 * t:16 * t + 32] * win)) for t in range(4)]  # (80-32)/16+1 = 4
            np.testing.assert_allclose(spec[h, i].numpy(), np.stack(frames, 1), rtol=1e-4, atol=1e-5)
            e = sum((1 - a) * a ** (3 - t) * frames[t] * (t >= first[h, i].item()) for t in range(4)) + 0.99 ** 64 * old[h, i].numpy()
            np.testing.assert_allclose(ema[h, i].numpy(), e, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(new_tail[h, i].numpy(), x[-16:], rtol=1e-6)


def test_fused_ema_equals_stft_then_ema():
    """The features' one-pass STFT -> EMA (matmul on strided frames, chunked) equals the two-step form,
    for query counts that are and are not multiples of the hop, and chunks that do not divide the frames."""
    cfg = NammConfig()
    g = torch.Generator().manual_seed(1)
    for h, q, n, chunk in [(2, 64, 5, 4), (3, 130, 40, 3), (1, 300, 17, 64)]:
        att = torch.softmax(torch.randn(h, q, n, generator=g), -1)
        tail, old = torch.rand(h, n, 16, generator=g), torch.rand(h, n, 17, generator=g)
        spec, tail2 = attention_spectrogram(att, tail, cfg)
        first = torch.randint(0, spec.shape[-1] + 1, (h, n), generator=g)
        ema, tail3 = ema_of_attention(att, tail, old, first, cfg, frames_per_chunk=chunk)
        torch.testing.assert_close(ema, ema_spectrogram(spec, old, first, q, cfg), rtol=1e-5, atol=1e-6)
        assert torch.equal(tail3, tail2)


def test_backward_mask_token_sees_only_itself_and_newer():
    m = backward_mask(4)
    assert torch.equal(torch.isinf(m), torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool))
    cfg = NammConfig()
    p = unflatten_params(0.2 * torch.randn(cfg.n_params, generator=torch.Generator().manual_seed(0)), cfg)
    x = torch.randn(1, 6, 25)
    s = bam_scores(x, p, cfg)
    x2 = x.clone()
    x2[:, :3] += torch.randn(1, 3, 25)  # change the OLDEST tokens
    s2 = bam_scores(x2, p, cfg)
    torch.testing.assert_close(s[:, 3:], s2[:, 3:])  # newer tokens never look back
    assert not torch.allclose(s[:, :3], s2[:, :3])
    x3 = x.clone()
    x3[:, 5] += 1.0  # the newest token changes everyone's score
    assert not torch.allclose(bam_scores(x3, p, cfg)[:, 0], s[:, 0])
    # The fused kernel equals the spec's formula: softmax(q k^T / sqrt(hidden) + backward mask) v.
    q, k, v = (x @ p["w_qkv"] + p["b_qkv"]).split(cfg.hidden, dim=-1)
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(cfg.hidden) + backward_mask(6), dim=-1)
    r, mult = ((att @ v) @ p["w_o"] + p["b_o"]).split(cfg.d_in, dim=-1)
    torch.testing.assert_close(s, (x * (1 + mult) + r) @ p["w_s"] + p["b_s"], atol=1e-5, rtol=1e-5)


def test_namm_threshold_mode_evicts_negative_scores(varied_llama):
    cfg = NammConfig(n_up=32)
    pol = NAMM(cfg=cfg)
    pol.params["b_s"][:] = -1.0  # every score negative: only the newest token survives each update
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(7))
    r = run_with_memory(varied_llama, ids, pol, None, max_new_tokens=1, keep_cache=True)
    assert r.cache.layers[0].keys.shape[2] == 1
    assert r.positions[0].tolist() == [[63], [63]]


def test_namm_calibration_save_load_and_layout_errors(tmp_path, varied_llama):
    pol = NAMM(cfg=NammConfig(n_up=32))
    pol.start_calibration()
    run_with_memory(varied_llama, torch.randint(0, 96, (1, 96)), pol, None, max_new_tokens=1)
    pol.finish_calibration()
    assert pol.norm_var.shape == (17,) and torch.all(pol.norm_mean > 0)
    pol.save(tmp_path / "n")
    back = NAMM.load(tmp_path / "n")
    assert torch.equal(back.norm_mean, pol.norm_mean) and back.cfg == pol.cfg
    meta = json.loads((tmp_path / "n" / "namm.json").read_text())
    meta["feature_layout"]["hidden"] = 16
    (tmp_path / "n" / "namm.json").write_text(json.dumps(meta))
    with pytest.raises(CelerisError, match="do not match the feature layout"):
        NAMM.load(tmp_path / "n")
    with pytest.raises(CelerisError, match="valid: full, streaming_llm"):
        make_policy("lru")


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "abc"])
def test_bad_budget_is_a_clear_error(bad):
    with pytest.raises(CelerisError, match="budget"):
        parse_budget(bad)


# ----------------------------------------------------------------------------- tasks
def test_tasks_deterministic_per_seed():
    a = make_tasks(None, [256], n=2, seed=3, count_tokens=_count)
    b = make_tasks(None, [256], n=2, seed=3, count_tokens=_count)
    c = make_tasks(None, [256], n=2, seed=4, count_tokens=_count)
    assert a == b and a != c
    assert {s["task"] for s in a} == set(KINDS)
    for s in a:
        assert set(s) >= {"id", "task", "context", "input", "answers", "length", "metric"}
        assert score_answer(s["answers"][0], s["answers"], s["metric"]) == 1.0
        if s["task"] != "code":
            assert s["answers"][0] in s["context"] or s["task"] == "variable_tracking"
    vt = [s for s in a if s["task"] == "variable_tracking"][0]
    assert f"= {vt['answers'][0]}." in vt["context"]


def test_prose_family_is_deterministic_and_each_answer_is_stated_once():
    from celeris.memory import prose_tasks

    a = make_tasks(None, [600], n=4, seed=3, count_tokens=_count, family="prose")
    assert a == make_tasks(None, [600], n=4, seed=3, count_tokens=_count, family="prose")
    assert a != make_tasks(None, [600], n=4, seed=4, count_tokens=_count, family="prose")
    assert [s["task"] for s in a[::4]] == list(prose_tasks.KINDS)
    for s in a:
        assert s["context"].count(s["answers"][0]) == 1, s["id"]
        assert 0.8 * 600 < s["length"] < 1.25 * 600, (s["id"], s["length"])
        assert score_answer(s["answer_prefix"] + " " + s["answers"][0] + ".", s["answers"], s["metric"]) == 1.0
    for kind in prose_tasks.KINDS:
        same = [s for s in a if s["task"] == kind]
        assert len({s["answers"][0] for s in same}) == len(same)  # not a constant answer
        for s, other in zip(same, same[1:] + same[:1], strict=True):  # another sample's answer is wrong here
            assert score_answer(other["answers"][0], s["answers"], s["metric"]) == 0.0


def test_prose_family_is_not_the_synthetic_templates_renamed():
    prose = make_tasks(None, [600], n=3, seed=5, count_tokens=_count, family="prose")
    synthetic = make_tasks(None, [600], n=3, seed=5, count_tokens=_count)
    assert not {s["id"] for s in prose} & {s["id"] for s in synthetic}
    assert not {s["task"] for s in prose} & set(KINDS)
    markers = ["The grass is green", "Here we go", "magic number", "pass key", "VAR ", "JSON data", "complete the code"]
    for s in prose:
        text = s["context"] + s["input"]
        assert not [m for m in markers if m in text], s["id"]


def test_prose_docstrings_are_real_stdlib_text():
    import inspect
    import textwrap

    from celeris.memory.prose_tasks import stdlib_docstrings

    entries = {f"{m}.{sig.split('(')[0]}": para for m, sig, para in stdlib_docstrings()}
    assert len(entries) > 200
    para = entries["textwrap.dedent"]
    assert " ".join(inspect.getdoc(textwrap.dedent).split("\n\n")[0].split()) == para


def test_unknown_family_or_kind_is_a_one_line_error(tmp_path, capsys):
    from celeris.cli import main

    with pytest.raises(CelerisError, match="unknown task family 'stories'; valid: synthetic, prose"):
        make_tasks(None, [128], n=1, count_tokens=_count, family="stories")
    for argv, msg in [(["--family", "nope"], "unknown task family 'nope'"),
                      (["--family", "prose", "--kinds", "passkey"], "unknown task kind 'passkey' for the prose family")]:
        with pytest.raises(SystemExit) as e:
            main(["tasks", "make", "--out", str(tmp_path / "t.jsonl"), "--lengths", "128", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "t.jsonl").exists()


def test_evolution_and_selection_refuse_the_held_out_family():
    from celeris.memory.evolve import EvolveConfig, evolve

    prose = make_tasks(["table_lookup"], [128], n=1, seed=0, count_tokens=_count, family="prose")
    synthetic = make_tasks(["passkey"], [128], n=1, seed=0, count_tokens=_count)
    cfg = EvolveConfig(stages=[["passkey"]], generations=[1])
    with pytest.raises(CelerisError, match="training sample table_lookup-128-s0-0 is of the 'prose' task family"):
        evolve(None, None, prose, "unused", cfg)
    with pytest.raises(CelerisError, match="validation sample .* held out from evolution and selection"):
        evolve(None, None, synthetic, "unused", cfg, val_samples=prose)


def test_scorers_accept_right_and_reject_wrong():
    assert score_answer(" 91211. It is the key.", ["91211"], "exact") == 1.0
    assert score_answer(" 91212.", ["91211"], "exact") == 0.0
    assert score_answer("The number is 1234567 indeed", ["1234567"], "contains") == 1.0
    assert score_answer("The number is 1234568", ["1234567"], "contains") == 0.0
    assert score_answer("```python\n# next\nx = foo(bar)\n", ["x = foo(bar)"], "code_sim") == 1.0
    assert score_answer("return None", ["x = foo(bar)"], "code_sim") < 0.4
    assert score_answer("the cat sat", ["cat sat down"], "f1") == pytest.approx(2 / 3)


def test_alpha_rename_is_consistent_and_valid_python():
    import random

    src = "import os\n\ndef area(width, height):\n    total = width * height\n    return os.sep, total\n"
    out, mapping = alpha_rename(src, random.Random(0))
    compile(out, "x", "exec")
    assert "width" not in out and "area" not in out and "os.sep" in out
    assert set(mapping) == {"area", "width", "height", "total"}


def test_task_reader_line_numbers_and_longbench_layout(tmp_path):
    good = {"id": "a", "task": "passkey", "context": "c", "input": "q", "answers": ["1"], "length": 1, "metric": "exact"}
    lb = {"_id": "x9", "dataset": "lcc", "context": "def f():\n", "input": "", "answers": ["    return 1"], "length": 3}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(lb) + "\n")
    rows = load_tasks(p)
    assert rows[1]["task"] == "lcc" and rows[1]["metric"] == "code_sim" and rows[1]["id"] == "x9"
    p.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(CelerisError, match=r"t.jsonl:3: not valid JSON"):
        load_tasks(p)
    p.write_text(json.dumps({**good, "answers": "1"}) + "\n")
    with pytest.raises(CelerisError, match=r":1: \"answers\""):
        load_tasks(p)


def test_cli_tasks_make_and_bad_policy(tmp_path, capsys, monkeypatch):
    from celeris.cli import main
    from celeris.memory import tasks as tasks_mod

    real = tasks_mod.make_tasks
    monkeypatch.setattr(tasks_mod, "make_tasks", lambda *a, **k: real(*a, **k, count_tokens=_count))
    out = tmp_path / "t.jsonl"
    main(["tasks", "make", "--out", str(out), "--kinds", "passkey,code", "--lengths", "128", "--n", "2", "--seed", "1"])
    assert len(load_tasks(out)) == 4
    with pytest.raises(SystemExit) as e:
        main(["memory", "eval", "--policy", "nope", "--tasks", str(out)])
    assert e.value.code == 2 and "valid: full" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "eval", "--policy", "h2o", "--budget", "1.5", "--tasks", str(out)])
    assert "budget" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kvpress peer, evolution
@pytest.fixture(scope="module")
def small_lm_and_tok():
    from celeris.models import load_tokenizer, new_model

    tok = load_tokenizer()
    model = new_model("nano", vocab_size=len(tok), max_position_embeddings=1024, seed=0).eval()
    return model, tok


@pytest.fixture
def press_record(monkeypatch):
    """What every kvpress `ScorerPress` (ours wrapped as one included) keeps and is given, per press class and
    layer: `.kept[press][layer]` the kept positions `[kv_heads, kept]`, sorted (recovered by matching the kept
    keys against the given ones, not from the press's own indices); `.keys[press][layer]` the given keys
    `[kv_heads, n, head_dim]`."""
    from types import SimpleNamespace

    import kvpress

    record = SimpleNamespace(kept={}, keys={})
    original = kvpress.ScorerPress.compress

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        k, v = original(self, module, hidden_states, keys, values, attentions, kwargs)
        same = (k[0][:, :, None, :] == keys[0][:, None, :, :]).all(-1)  # [heads, kept, n]
        assert bool((same.sum(-1) == 1).all())  # every kept key is exactly one of the given keys
        name = type(self).__name__
        record.kept.setdefault(name, {})[module.layer_idx] = same.float().argmax(-1).sort(-1).values
        record.keys.setdefault(name, {})[module.layer_idx] = keys[0].detach().clone()
        return k, v

    monkeypatch.setattr(kvpress.ScorerPress, "compress", compress)
    return record


def _keeps_lowest_norms(kept: torch.Tensor, keys: torch.Tensor, newest: bool = False) -> bool:
    """Whether `kept` `[heads, k]` holds, in every head, k distinct positions of the lowest L2 norms of `keys`
    `[heads, n, head_dim]` (which of several equal norms, e.g. a repeated token's layer-0 keys, is the press's
    choice); with `newest`, the newest position plus the k - 1 lowest of the others."""
    norms = keys.float().norm(dim=-1)
    n = norms.shape[1]
    for h, row in enumerate(kept.tolist()):
        pool = list(range(n - 1 if newest else n))
        if len(set(row)) != len(row) or (newest and n - 1 not in row):
            return False
        row = [i for i in row if not (newest and i == n - 1)]
        if not torch.equal(norms[h, row].sort().values, norms[h, pool].sort().values[: len(row)]):
            return False
    return True


def test_kvpress_press_compresses_the_context(small_lm_and_tok, press_record):
    from transformers import DynamicCache

    from celeris.memory.presses import make_press, run_with_press

    model, _ = small_lm_and_tok
    ids = torch.randint(0, 1000, (1, 120), generator=torch.Generator().manual_seed(8))
    r = run_with_press(model, ids, 100, make_press("KnormPress", 0.25), max_new_tokens=5)
    assert len(r.new_ids) == 5
    assert r.kept_fraction == pytest.approx((25 + 20 + 4) / 124)  # 25 of 100 context tokens, question and answer kept
    assert r.kv_bytes_ratio < 1.0
    # Which 25: in every layer and head, the context keys of lowest norm, from a plain prefill of the context.
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :100], past_key_values=cache, use_cache=True)
    kept = press_record.kept["KnormPress"]
    assert sorted(kept) == list(range(len(cache.layers)))
    for layer, kv in enumerate(cache.layers):
        assert kept[layer].shape == (kv.keys.shape[1], 25) and _keeps_lowest_norms(kept[layer], kv.keys[0]), layer


def test_only_presses_that_read_attention_run_eager(small_lm_and_tok):
    """Presses and policies that read attention weights run under eager attention (and work); the
    others under SDPA, as kvpress runs them, whatever the model was loaded with."""
    from celeris.memory.presses import make_press, policy_press, press_needs_attention, run_with_press
    from celeris.memory.runner import eager_attention

    model, _ = small_lm_and_tok
    assert press_needs_attention(make_press("ObservedAttentionPress", 0.5))
    assert press_needs_attention(policy_press(NAMM(), 0.5)) and press_needs_attention(policy_press(H2O(), 0.5))
    assert not press_needs_attention(make_press("KnormPress", 0.5)) and not press_needs_attention(None)
    assert not press_needs_attention(make_press("SnapKVPress", 0.5)) and not press_needs_attention(policy_press(L2Norm(), 0.5))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    ids = torch.randint(0, 1000, (1, 120), generator=torch.Generator().manual_seed(3))
    try:
        with eager_attention(model):  # as if loaded eager
            assert len(run_with_press(model, ids, 100, make_press("ObservedAttentionPress", 0.25), max_new_tokens=3).new_ids) == 3
            assert seen[0] == "eager" and set(seen[1:]) == {"sdpa"}  # the prefill reads weights, the answer does not
            seen.clear()
            run_with_press(model, ids, 100, make_press("KnormPress", 0.25), max_new_tokens=3)
            assert set(seen) == {"sdpa"}
            seen.clear()
            run_with_memory(model, ids, L2Norm(), parse_budget("0.5"), n_up=32, max_new_tokens=2)
            assert set(seen) == {"sdpa"}
            assert model.config._attn_implementation == "eager"  # restored
    finally:
        hook.remove()


def test_attention_switch_that_fails_warns_once_and_is_recorded(small_lm_and_tok, monkeypatch):
    """A model that cannot switch to SDPA keeps its attention: one warning, and the result says which ran."""
    import warnings

    from celeris.memory import runner
    from celeris.memory.runner import eager_attention

    model, _ = small_lm_and_tok
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(4))
    assert run_with_memory(model, ids, L2Norm(), parse_budget("0.5"), n_up=16, max_new_tokens=1).extra["attention"] == "sdpa"
    monkeypatch.setattr(runner, "_WARNED_ATTENTION", set())
    with eager_attention(model):  # as if loaded eager, by a model without SDPA
        switch = model.set_attn_implementation

        def no_sdpa(name):
            if name == "sdpa":
                raise ValueError("no SDPA here")
            switch(name)

        monkeypatch.setattr(model, "set_attn_implementation", no_sdpa)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                used = [run_with_memory(model, ids, L2Norm(), parse_budget("0.5"), n_up=16, max_new_tokens=1).extra["attention"]
                        for _ in range(2)]
        finally:
            monkeypatch.undo()  # before eager_attention restores SDPA
    assert used == ["eager", "eager"]
    assert [str(w.message) for w in caught if "cannot switch" in str(w.message)] == [
        f"{type(model).__name__} cannot switch to sdpa attention (no SDPA here); running with eager instead"]


def test_evolve_checkpoints_and_resumes(tmp_path, small_lm_and_tok):
    from dataclasses import asdict

    from celeris.memory.evolve import EvolveConfig, evolve

    model, tok = small_lm_and_tok
    samples = make_tasks(["passkey", "kv_uuid"], [96], n=2, seed=9, count_tokens=lambda s: len(tok(s)["input_ids"]))
    cfg = EvolveConfig(stages=[["passkey"], ["passkey", "kv_uuid"]], generations=[1, 1], population=2, batch_per_task=1,
                       max_new_tokens=2, cfg=asdict(NammConfig(n_up=32)))
    s1 = evolve(model, tok, samples, tmp_path / "ev", cfg, progress=False, stop_after=1)  # "killed" after 1 generation
    assert s1["generation"] == 1 and (tmp_path / "ev" / "checkpoint" / "evolve.json").is_file()
    first = NAMM.load(tmp_path / "ev")
    assert first.params_vector.abs().sum() > 0 and first.meta["generation"] == 1
    s2 = evolve(model, tok, samples, tmp_path / "ev", cfg, progress=False)
    assert s2["generation"] == 2 and [h["stage"] for h in s2["history"]] == [1, 2]
    assert len(NAMM.load(tmp_path / "ev").meta["train_sample_hashes"]) == 4
    (tmp_path / "ev" / "namm.json").unlink()  # the same command on a finished run rewrites the parameter files
    s3 = evolve(model, tok, samples, tmp_path / "ev", cfg, progress=False)
    again = NAMM.load(tmp_path / "ev")
    assert s3["generation"] == 2 and again.meta["protocol"] == "chunked" and again.meta["generation"] == 2


# ----------------------------------------------------------------------------- integration (real model)
def test_default_model_passkey_full_and_evicted(default_model):
    from celeris.generation import eos_token_ids
    from celeris.memory.tasks import build_prompt

    model, tok = default_model
    s = make_tasks(["passkey"], [200], n=1, seed=0, count_tokens=lambda t: len(tok(t)["input_ids"]))[0]
    ids, split = build_prompt(s, tok)
    eos = eos_token_ids(model, tok)
    ref = decode(model, ids, 8, eos_ids=eos).tolist()
    full = run_with_memory(model, ids, FullCache(), None, max_new_tokens=8, eos_ids=eos)
    assert full.new_ids == ref
    h2o = run_with_memory(model, ids, H2O(), parse_budget("0.5"), max_new_tokens=8, eos_ids=eos)
    assert h2o.evictions >= 1
    assert h2o.kv_bytes_ratio < 0.75 and h2o.peak_kv_bytes < full.peak_kv_bytes


def test_default_model_reads_the_prose_family(default_model):
    """With the full cache the real model answers prose questions, and only with the context: a family it
    could answer blind, or not at all, would not rank memory policies."""
    from celeris.memory.evaluate import evaluate_policy

    model, tok = default_model
    samples = make_tasks(None, [400], n=2, seed=0, count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]),
                         family="prose")
    full = evaluate_policy(model, tok, samples, "full", None, protocol="press")
    blind = evaluate_policy(model, tok, [{**s, "context": ""} for s in samples], "full", None, protocol="press")
    assert sum(r["score"] for r in full["per_sample"]) >= 3
    assert sum(r["score"] for r in blind["per_sample"]) == 0


def test_generate_with_memory_reports_kv_bytes(small_lm_and_tok):
    from celeris.api import generate

    model, tok = small_lm_and_tok
    r = generate(model, tok, "hello " * 300, max_new_tokens=4, chat=False, memory="streaming_llm", budget="0.25")
    plain = generate(model, tok, "hello " * 300, max_new_tokens=4, chat=False)
    assert r.new_tokens == 4 and r.prompt_tokens == plain.prompt_tokens
    assert r.stats["kv_bytes_ratio"] < 0.6 and r.stats["kept_fraction"] < 0.6
    with pytest.raises(CelerisError, match="greedily"):
        generate(model, tok, "hi", temperature=1.0, memory="h2o")


def test_namm_threshold_mode_with_uneven_layers_keeps_one_size_per_layer(varied_llama):
    """HF builds one causal mask for all layers: threshold mode must leave every layer the same length."""
    pol = NAMM(0.5 * torch.randn(4172, generator=torch.Generator().manual_seed(0)), NammConfig(n_up=32))
    r = run_with_memory(varied_llama, torch.randint(0, 96, (1, 150)), pol, None, max_new_tokens=40, keep_cache=True)
    sizes = {layer.keys.shape[2] for layer in r.cache.layers}
    assert len(sizes) == 1 and r.kept_fraction < 0.9 and len(r.new_ids) == 40


# ----------------------------------------------------------------------------- protocol A (press) and dense fitness
def test_celeris_policy_as_press_matches_the_kvpress_twin(small_lm_and_tok, press_record):
    """StreamingLLM wrapped as a kvpress ScorerPress keeps exactly what kvpress's StreamingLLMPress keeps."""
    from celeris.memory.presses import make_press, policy_press, run_with_press

    model, _ = small_lm_and_tok
    ids = torch.randint(0, 1000, (1, 140), generator=torch.Generator().manual_seed(5))
    ours = run_with_press(model, ids, 120, policy_press(StreamingLLM(), 0.25), max_new_tokens=6)
    theirs = run_with_press(model, ids, 120, make_press("StreamingLLMPress", 0.25), max_new_tokens=6)
    # 30 of the 120 context tokens in every layer and head: the 4 sinks and the 26 most recent.
    want = torch.tensor([*range(4), *range(120 - 26, 120)])
    kept_ours, kept_theirs = press_record.kept["CelerisPolicyPress"], press_record.kept["StreamingLLMPress"]
    assert sorted(kept_ours) == sorted(kept_theirs) == list(range(model.config.num_hidden_layers))
    for layer, kept in kept_ours.items():
        assert torch.equal(kept, want.expand_as(kept)) and torch.equal(kept_theirs[layer], kept), layer
    assert ours.new_ids == theirs.new_ids and ours.peak_kv_bytes == theirs.peak_kv_bytes


def test_answer_likelihood_is_the_same_in_both_protocols_with_a_full_cache(small_lm_and_tok):
    from celeris.memory.presses import run_with_press

    model, _ = small_lm_and_tok
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(6))
    ref = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(7))
    logits = model(torch.cat([ids, ref], 1)).logits[0, 99:-1]
    direct = torch.log_softmax(logits, -1).gather(1, ref[0][:, None]).mean().item()
    chunked = run_with_memory(model, ids, FullCache(), None, n_up=32, reference_ids=ref)
    press = run_with_press(model, ids, 80, None, reference_ids=ref)
    assert chunked.new_ids == [] and press.new_ids == []
    assert chunked.extra["answer_logprob"] == pytest.approx(direct, abs=1e-4)
    assert press.extra["answer_logprob"] == pytest.approx(direct, abs=1e-4)
    evicted = run_with_memory(model, ids, L2Norm(), parse_budget("0.2"), n_up=32, reference_ids=ref)
    assert evicted.extra["answer_logprob"] != pytest.approx(direct, abs=1e-4)


def test_evolve_in_the_press_protocol_with_dense_fitness(tmp_path, small_lm_and_tok):
    from dataclasses import asdict

    from celeris.memory.evaluate import evaluate_policy
    from celeris.memory.evolve import EvolveConfig, evolve

    model, tok = small_lm_and_tok
    samples = make_tasks(["passkey"], [96], n=3, seed=10, count_tokens=lambda s: len(tok(s)["input_ids"]))
    cfg = EvolveConfig(stages=[["passkey"]], generations=[1], population=2, batch_per_task=2, max_new_tokens=2,
                       protocol="press", fitness="both", cfg=asdict(NammConfig(n_up=32)))
    state = evolve(model, tok, samples[:2], tmp_path / "ev", cfg, progress=False)
    h = state["history"][0]
    assert 0.0 < h["best_fitness"] and set(state["full_scores"][samples[0]["id"]]) == {"score", "p"}
    namm = NAMM.load(tmp_path / "ev")
    assert not torch.allclose(namm.norm_var, torch.ones_like(namm.norm_var))  # calibrated in the press protocol
    res = evaluate_policy(model, tok, samples[2:], namm, parse_budget("0.5"), protocol="press", max_new_tokens=2)
    assert res["protocol"] == "press" and res["kept_fraction"] < 0.75
    with pytest.raises(CelerisError, match="fraction"):
        evaluate_policy(model, tok, samples[2:], namm, None, protocol="press")
    with pytest.raises(CelerisError, match="protocol"):
        evaluate_policy(model, tok, samples[2:], namm, parse_budget("0.5"), protocol="oneshot")

    # Continue from these parameters on another sample: the search starts at them (a vanishing step size leaves
    # the mean where it started), keeps their frozen normalisation and guards both runs' training samples.
    more = EvolveConfig(**{**asdict(cfg), "sigma": 1e-9, "init": str(tmp_path / "ev")})
    evolve(model, tok, samples[2:], tmp_path / "ev2", more, progress=False)
    cont = NAMM.load(tmp_path / "ev2")
    assert torch.allclose(cont.params_vector, namm.params_vector, atol=1e-6) and namm.params_vector.abs().sum() > 0
    assert torch.equal(cont.norm_mean, namm.norm_mean) and torch.equal(cont.norm_var, namm.norm_var)
    assert len(cont.meta["train_sample_hashes"]) == 3 and cont.meta["init"]["generation"] == 1
    other = EvolveConfig(**{**asdict(more), "cfg": asdict(NammConfig(n_up=32, hidden=16))})
    with pytest.raises(CelerisError, match="feature layout"):
        evolve(model, tok, samples[2:], tmp_path / "ev3", other, progress=False)


def test_evolve_validates_the_mean_and_keeps_the_best(tmp_path, small_lm_and_tok):
    """`val_samples`: every k-th generation's mean is scored on held-out samples, as a direct evaluation scores it,
    and the best one (the earliest of equals) is what OUT/best/ holds; resume keeps the record, refuses another file."""
    from dataclasses import asdict

    from celeris.memory.evaluate import evaluate_policy
    from celeris.memory.evolve import EvolveConfig, evolve
    from celeris.models import new_model

    _, tok = small_lm_and_tok
    model = new_model("nano", vocab_size=len(tok), max_position_embeddings=1024, seed=1, initializer_range=0.3).eval()
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    train = make_tasks(["passkey"], [96], n=2, seed=14, count_tokens=count)
    val = make_tasks(["passkey", "variable_tracking"], [96], n=2, seed=15, count_tokens=count)
    # A random model never finds a pass key: make each answer the full cache's own greedy reply instead, so that
    # the full cache scores 1 and a pruned cache scores less where pruning changes the reply.
    full = evaluate_policy(model, tok, val, "full", None, protocol="chunked")
    val = [{**s, "answers": [r["prediction"]], "metric": "exact"} for s, r in zip(val, full["per_sample"], strict=True)]
    cfg = EvolveConfig(stages=[["passkey"]], generations=[3], population=2, batch_per_task=1, max_new_tokens=2,
                       protocol="press", fitness="likelihood", sigma=2.0, cfg=asdict(NammConfig(n_up=32)))
    out = tmp_path / "ev"
    evolve(model, tok, train, out, cfg, progress=False, stop_after=2, val_samples=val, val_every=2)
    state = evolve(model, tok, train, out, cfg, progress=False, val_samples=val, val_every=2)  # resumed
    v = state["validation"]
    assert [r["generation"] for r in v["history"]] == [2, 3]  # every 2nd generation and the last one
    best = max(v["history"], key=lambda r: r["mean_score"])
    assert v["best"] == best and NAMM.load(out / "best").meta["generation"] == best["generation"]
    direct = evaluate_policy(model, tok, val, NAMM.load(out / "best"), parse_budget("0.25"), protocol="press",
                             max_new_tokens=2)
    assert direct["mean_score"] == pytest.approx(best["mean_score"]) and direct["per_task"] == best["per_task"]
    assert v["full"]["mean_score"] == 1.0 and min(r["mean_score"] for r in v["history"]) < 1.0
    assert NAMM.load(out).meta["validation"]["best"] == best  # recorded beside the last mean too
    with pytest.raises(CelerisError, match="another file"):
        evolve(model, tok, train, out, cfg, progress=False, val_samples=val[:2])
    with pytest.raises(CelerisError, match="training samples"):
        evolve(model, tok, train, tmp_path / "ev2", cfg, progress=False, val_samples=val + train[:1])


def test_bench_runs_policies_in_both_protocols_beside_a_press(small_lm_and_tok, press_record):
    from celeris.memory.evaluate import bench_memory, format_table

    model, tok = small_lm_and_tok
    samples = make_tasks(["passkey"], [96], n=1, seed=12, count_tokens=lambda s: len(tok(s)["input_ids"]))
    res = bench_memory(model, tok, samples, [0.25], ["l2"], ["KnormPress"], n_up=32, max_new_tokens=2, progress=False,
                       repeats=2)
    rows = [(r["policy"], r["protocol"]) for r in res["results"]]
    assert rows == [("full", "chunked"), ("l2", "press"), ("l2", "chunked"), ("KnormPress", "press")]
    for r in res["results"]:  # each sample timed twice after its scored run; tokens/s per timed pass
        (row,) = r["per_sample"]
        t = r["tokens_per_second"]
        assert len(row["timed_seconds"]) == 2 and r["timed_runs"] == 2
        assert t["runs"] == pytest.approx([row["tokens"] / s for s in row["timed_seconds"]])
        assert (t["min"], t["max"]) == (min(t["runs"]), max(t["runs"])) and t["min"] <= t["median"] <= t["max"]
    assert res["repeats"] == 2 and {"commit", "cpu", "threads", "torch", "artifacts"} <= set(res["environment"])
    # Same rule, same protocol: both keep the context keys of lowest norm, except that a Celeris policy as a
    # press always keeps the newest context token (in place of the highest-norm key it would keep otherwise).
    l2_kept, knorm_kept = press_record.kept["CelerisPolicyPress"], press_record.kept["KnormPress"]
    assert sorted(l2_kept) == sorted(knorm_kept) == list(range(model.config.num_hidden_layers))
    for layer, keys in press_record.keys["KnormPress"].items():
        assert torch.equal(press_record.keys["CelerisPolicyPress"][layer], keys)
        assert l2_kept[layer].shape == knorm_kept[layer].shape == (keys.shape[0], int(0.25 * keys.shape[1]))
        assert _keeps_lowest_norms(knorm_kept[layer], keys), layer
        assert _keeps_lowest_norms(l2_kept[layer], keys, newest=True), layer
    assert "press" in format_table(res["results"])
    with pytest.raises(CelerisError, match="protocol"):
        bench_memory(model, tok, samples, [0.25], ["l2"], [], protocols=["oneshot"], progress=False)
    with pytest.raises(CelerisError, match="--repeats must be a whole number of at least 1"):
        bench_memory(model, tok, samples, [0.25], ["l2"], [], progress=False, repeats=0)


def test_prefill_store_gives_the_press_run(tmp_path, small_lm_and_tok):
    """One stored prefill, pruned by each candidate's scores, answers exactly as a fresh press run does."""
    from dataclasses import asdict

    from celeris.memory.evaluate import run_policy_on_sample
    from celeris.memory.evolve import EvolveConfig, PrefillStore, evolve
    from celeris.memory.tasks import build_prompt

    model, tok = small_lm_and_tok
    samples = make_tasks(["passkey"], [96], n=2, seed=13, count_tokens=lambda s: len(tok(s)["input_ids"]))
    namm = NAMM(cfg=NammConfig(n_up=32))
    store = PrefillStore(model, tok, namm)
    budget = parse_budget("0.3")
    g = torch.Generator().manual_seed(0)
    for s in samples:
        ref = tok(" " + s["answers"][0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        split = build_prompt(s, tok)[1]
        for _ in range(2):  # two parameter vectors over the same stored prefill
            namm.set_params(torch.randn(namm.cfg.n_params, generator=g))
            fresh = run_policy_on_sample(model, tok, s, namm, budget, "press", likelihood=True)
            _, extra = store.run(s, budget, 0, (), ref)
            assert extra["answer_logprob"] == pytest.approx(fresh.extra["answer_logprob"], abs=1e-5)
            assert fresh.kept_fraction < 0.6  # the context was pruned, so the scores mattered
            fresh = run_policy_on_sample(model, tok, s, namm, budget, "press")  # the sample's own answer length
            assert store.run(s, budget, int(s["max_new_tokens"]), ())[0] == fresh.new_ids
        pre = store.get(s)
        assert pre.split == split and pre.keys[0].shape[2] == split
    # A prefill pruned by other scores answers differently (the check above can fail).
    s, pre = samples[0], store.get(samples[0])
    from celeris.memory.presses import answer_prefill, compress_prefill
    keep_old = compress_prefill(model, pre, [-torch.arange(k.shape[2]).float().expand(k.shape[1], -1) for k in pre.keys], 0.3)
    keep_new = compress_prefill(model, pre, [torch.arange(k.shape[2]).float().expand(k.shape[1], -1) for k in pre.keys], 0.3)
    ref = tok(" " + s["answers"][0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    a = answer_prefill(model, pre, keep_old, reference_ids=ref)[1]["answer_logprob"]
    b = answer_prefill(model, pre, keep_new, reference_ids=ref)[1]["answer_logprob"]
    assert abs(a - b) > 1e-4

    # The evolution gives the same fitness with and without the store.
    cfg = EvolveConfig(stages=[["passkey"]], generations=[1], population=2, batch_per_task=2, max_new_tokens=2,
                       protocol="press", fitness="both", sigma=0.5, cfg=asdict(NammConfig(n_up=32)))
    fast = evolve(model, tok, samples, tmp_path / "fast", cfg, progress=False)["history"][0]
    slow = evolve(model, tok, samples, tmp_path / "slow", cfg, progress=False, reuse_prefill=False)["history"][0]
    for key in ("best_fitness", "mean_fitness_of_population", "fitness_of_mean"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-4)
    # With the likelihood fitness all candidates share one batched forward per sample: the same numbers.
    vecs = [torch.randn(namm.cfg.n_params, generator=g) for _ in range(3)]
    ref = tok(" " + samples[1]["answers"][0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    batched = store.likelihoods(samples[1], vecs, budget, ref)
    for v, p in zip(vecs, batched, strict=True):
        namm.set_params(v)
        assert p == pytest.approx(math.exp(store.run(samples[1], budget, 0, (), ref)[1]["answer_logprob"]), rel=1e-4)
    assert max(batched) / min(batched) > 1.001  # the vectors keep different tokens
    lik = EvolveConfig(**{**asdict(cfg), "fitness": "likelihood"})
    fast = evolve(model, tok, samples, tmp_path / "fast-l", lik, progress=False)["history"][0]
    slow = evolve(model, tok, samples, tmp_path / "slow-l", lik, progress=False, reuse_prefill=False)["history"][0]
    for key in ("best_fitness", "mean_fitness_of_population", "fitness_of_mean"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-4)
    namm.norm_var = namm.norm_var * 2
    with pytest.raises(RuntimeError, match="normalisation"):
        store.get(samples[0])
