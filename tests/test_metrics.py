"""BrierLM estimators: unbiased against the closed form, and the perfect / uniform predictor values."""

from __future__ import annotations

import math

import pytest
import torch

from celeris.metrics import brier_lm, brier_rao_blackwell, brier_two_sample, brierlm_from_scores


def _context_free_lm(tiny_llama, log_probs: torch.Tensor):
    """The tiny Llama with its output layer replaced: it predicts `softmax(log_probs)` whatever the context."""
    V = tiny_llama.config.vocab_size
    head = torch.nn.Linear(tiny_llama.config.hidden_size, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(log_probs)
    tiny_llama.lm_head = head
    return tiny_llama


def _closed_form(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Brier-n = 2·∏P(y_j) − (ΣP²)^n for an i.i.d. categorical P over n-grams; y: [n]."""
    sq = float((p * p).sum())
    return torch.tensor([2 * float(p[y[:n]].prod()) - sq**n for n in range(1, len(y) + 1)])


def test_two_sample_estimator_is_unbiased_on_a_toy_categorical():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    y = torch.tensor([0, 0, 1, 0])
    draws = 200_000
    x1 = torch.multinomial(p, draws * 4, replacement=True, generator=g).view(draws, 4)
    x2 = torch.multinomial(p, draws * 4, replacement=True, generator=g).view(draws, 4)
    est = brier_two_sample(x1, x2, y.expand(draws, 4)).mean(0)
    assert torch.allclose(est, _closed_form(p, y), atol=4e-3)


def test_rao_blackwell_estimator_is_unbiased_on_a_toy_categorical(tiny_llama):
    p = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * 92)
    model = _context_free_lm(tiny_llama, torch.log(p.clamp_min(1e-30)))
    block = torch.tensor([0, 1, 0, 0, 2, 0, 1, 3] * 8)
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([brier_rao_blackwell(model, block, 4, g) for _ in range(30)])
    expected = torch.stack([_closed_form(p, block[i : i + 4]) for i in range(1, len(block) - 3)] * 30)
    assert scores.shape == expected.shape
    # The accuracy part is exact, so Brier-1 is exact; the collision part is unbiased.
    assert torch.allclose(scores[:, 0], expected[:, 0], atol=1e-5)
    assert torch.allclose(scores.mean(0), expected.mean(0), atol=6e-3)


def test_perfect_predictor_scores_100(tiny_llama):
    logits = torch.full((96,), -1e4)
    logits[7] = 0.0
    model = _context_free_lm(tiny_llama, logits)

    class Tok:  # token_blocks only needs these
        eos_token_id = 7

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[7] * 40 for _ in texts]}

    res = brier_lm(model, Tok(), ["x", "y"], block_size=16)
    assert res.brier == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-6)
    assert res.brierlm == pytest.approx(100.0, abs=1e-4)
    assert res.positions == 5 * (16 - 4)


def test_uniform_predictor_scores_v_to_the_minus_n(tiny_llama):
    V = 96
    model = _context_free_lm(tiny_llama, torch.zeros(V))
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, V, (128,), generator=g)
    scores = brier_rao_blackwell(model, block, 4, g)
    assert torch.allclose(scores[:, 0], torch.full((124,), 1.0 / V), atol=1e-6)  # 2/V − 1/V, exact
    mean = scores.mean(0)
    for n in (2, 3, 4):
        assert abs(float(mean[n - 1]) - V ** -n) < 3e-3  # unbiased; rare collisions make it noisy
    assert brierlm_from_scores([V**-n for n in range(1, 5)]) == pytest.approx(100 * V ** (-10 / 4))


def test_brierlm_is_zero_when_a_score_is_negative():
    assert brierlm_from_scores([0.5, 0.2, 0.1, -0.01]) == 0.0
    assert brierlm_from_scores([0.5, 0.2, 0.1, 0.05]) == pytest.approx(100 * (0.5 * 0.2 * 0.1 * 0.05) ** 0.25)
    assert math.isclose(brierlm_from_scores([1, 1, 1, 1]), 100.0)


def _exact_brier(model, block: torch.Tensor, i: int, V: int) -> torch.Tensor:
    """Brier-1..4 at position i by enumerating every 3-token continuation (V³ rows)."""
    cont = torch.cartesian_prod(*[torch.arange(V)] * 3)  # [V³, 3]
    seqs = torch.cat([block[:i].expand(len(cont), i), cont], 1)
    with torch.no_grad():
        p = model(input_ids=seqs).logits.float().softmax(-1)  # p[:, i-1+k] = P(· | prefix, c_{<k})
        tf = model(input_ids=block[None]).logits[0].float().softmax(-1)
    acc = torch.stack([tf[i - 1 + j, block[i + j]] for j in range(4)]).cumprod(0)
    sq = [(p[:, i - 1 + k] ** 2).sum(-1) for k in range(4)]  # Σ_x P(x | prefix, c_{<k})², per row
    first = [p[:, i - 1 + k].gather(1, cont[:, k : k + 1]).squeeze(1) ** 2 for k in range(3)]
    coll = [float(sq[0][0])]
    for n in range(2, 5):
        # Σ over (c_1..c_{n-1}) of ∏ P(c_k|…)² · Σ_x P(x | prefix, c)²; rows with c_{≥n} = 0 enumerate each path once.
        rows = (cont[:, n - 1 :] == 0).all(1)
        w = torch.stack(first[: n - 1], 1).prod(1)
        coll.append(float((w * sq[n - 1])[rows].sum()))
    return 2 * acc - torch.tensor(coll)


def test_rao_blackwell_estimator_matches_enumeration_on_a_context_dependent_model():
    from celeris.models import new_model

    V = 6
    model = new_model("nano", vocab_size=V, max_position_embeddings=64, seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper, context-dependent distributions (tied to the embedding)
    block = torch.tensor([1, 4, 2, 2, 5, 0, 3, 1, 4, 2])
    g = torch.Generator().manual_seed(0)
    est = torch.stack([brier_rao_blackwell(model, block, 4, g, row_chunk=3) for _ in range(400)]).mean(0)
    exact = torch.stack([_exact_brier(model, block, i, V) for i in range(1, len(block) - 3)])
    assert torch.allclose(est[:, 0], exact[:, 0], atol=1e-5)
    assert torch.allclose(est, exact, atol=0.05), (est - exact).abs().max()


def test_brierlm_is_zero_when_an_even_number_of_scores_is_negative():
    assert brierlm_from_scores([-0.2, -0.1, 0.1, 0.05]) == 0.0


@torch.no_grad()
def _brier_along_the_greedy_path(model, block: torch.Tensor) -> torch.Tensor:
    """Brier-1..4 at positions i = 1..T-4 of `block` `[T]` as the Rao-Blackwellised estimator gives them when
    both of its samples are always the likeliest token: 2·P(y_i … y_{i+n-1}) (teacher-forced) minus
    Σ_x P(x | y_{<i}, g_1 … g_{n-1})², g the greedy continuation, here from plain greedy `generate` at each
    position. Returns `[T - 4, 4]`."""
    T = len(block)
    p = model(input_ids=block[None]).logits[0].float().softmax(-1)  # p[t] = P(· | y_{≤t})
    rows = []
    for i in range(1, T - 3):
        acc = torch.stack([p[i - 1 + j, block[i + j]] for j in range(4)]).cumprod(0)
        out = model.generate(block[None, :i], attention_mask=torch.ones(1, i, dtype=torch.long), max_new_tokens=4,
                             do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        collision = torch.stack(out.logits)[:, 0].float().softmax(-1).square().sum(-1)  # step k: after g_1 … g_k
        rows.append(2 * acc - collision)
    return torch.stack(rows)


def test_brier_lm_of_the_default_model_on_stdlib_text(default_model, monkeypatch):
    import inspect

    import celeris.metrics as M

    model, tok = default_model
    text = inspect.getsource(pytest.approx)
    res = brier_lm(model, tok, text, block_size=64, max_tokens=128)
    assert res.positions == 2 * 60
    b1, b2, b3, b4 = res.brier
    assert 1 > b1 > b2 > b3 > b4 > 0  # longer n-grams are harder to predict
    assert res.brierlm == pytest.approx(100 * (b1 * b2 * b3 * b4) ** 0.25)
    blocks = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:128]).view(2, 64)
    with torch.no_grad():  # Brier-1 samples nothing: 2·P(y_i) − Σ_x P(x)², exactly
        P = model(input_ids=blocks).logits[:, :60].float().softmax(-1)
    exact1 = 2 * P.gather(2, blocks[:, 1:61, None])[..., 0] - P.square().sum(-1)
    assert b1 == pytest.approx(float(exact1.mean()), abs=1e-5)
    # With a sampler that always draws the likeliest token, every Brier-n is a fixed number: pin all four.
    monkeypatch.setattr(M, "_sample", lambda probs, generator: probs.argmax(-1))
    greedy = brier_lm(model, tok, text, block_size=32, max_tokens=32)
    want = _brier_along_the_greedy_path(model, blocks[0, :32]).mean(0)
    assert greedy.positions == 28 and greedy.brier == pytest.approx(want.tolist(), abs=1e-5)
    assert float(want.min()) < 0 and greedy.brierlm == 0.0  # the greedy path collides more often than it is right


def test_brier_lm_reports_each_brier_n_with_its_standard_error(tiny_llama, monkeypatch):
    import celeris.metrics as M

    rows = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.3, 0.2, 0.0, -0.1], [0.1, 0.0, -0.2, -0.3]])  # per position

    class Tok:
        eos_token_id = 7

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[7] * 16 for _ in texts]}

    monkeypatch.setattr(M, "brier_rao_blackwell", lambda model, block, *a: rows)
    res = brier_lm(tiny_llama, Tok(), "x", block_size=16)
    assert res.positions == 3 and res.brier == pytest.approx([0.3, 0.2, 0.0, -0.1])
    assert res.brier_stderr == pytest.approx([0.2 / math.sqrt(3)] * 4)  # std of each column is 0.2
    assert res.brierlm == 0.0
    assert res.to_dict()["zero_reason"] == (
        "BrierLM is 0 because Brier-3 = 0.0000 ± 0.1155, Brier-4 = -0.1000 ± 0.1155 are not positive "
        "(the geometric mean of Brier-1..4 is then 0); score a longer text or a stronger model")


def test_brierlm_cli_says_why_the_score_is_zero(tmp_path, monkeypatch, capsys):
    import json

    import celeris.calm.artifacts
    import celeris.metrics as M
    from celeris.cli import main
    from celeris.metrics import BrierResult

    text = tmp_path / "t.txt"
    text.write_text("a short text")
    res = BrierResult(0.0, [0.4, 0.2, 0.05, -0.0006], 248, "exact accuracy", [0.03, 0.02, 0.01, 0.0009])
    monkeypatch.setattr(celeris.calm.artifacts, "load_any", lambda model: (None, None))
    monkeypatch.setattr(M, "brier_lm", lambda *a, **k: res)
    main(["brierlm", "--text", str(text)])
    out, err = capsys.readouterr()
    assert "Brier-1..4: 0.4000 ± 0.0300, 0.2000 ± 0.0200, 0.0500 ± 0.0100, -0.0006 ± 0.0009; 248 positions" in out
    assert err.strip() == ("BrierLM is 0 because Brier-4 = -0.0006 ± 0.0009 is not positive (the geometric mean of "
                           "Brier-1..4 is then 0); score a longer text or a stronger model")
    main(["brierlm", "--text", str(text), "--json"])
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["brier_stderr"] == [0.03, 0.02, 0.01, 0.0009] and d["zero_reason"] == err.strip()
