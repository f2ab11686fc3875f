"""CALM: energy loss, energy head, autoencoder round trip, samplers, generation and clear errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from celeris.calm.autoencoder import Autoencoder, AutoencoderConfig, token_accuracy
from celeris.calm.model import CALM, CALMConfig, EnergyHead, energy_loss
from celeris.calm.sampling import batch_temperature_sample, calm_generate, exact_temperature_sample
from celeris.errors import CelerisError


def test_energy_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 5, generator=g), torch.randn(6, 3, 5, generator=g)
    for beta in (1.0, 1.5):
        direct = []
        for p in range(3):
            fit = sum(float((x[n, p] - y[m, p]).norm() ** beta) for n in range(4) for m in range(6)) / 24
            spread = sum(float((x[n, p] - x[k, p]).norm() ** beta) for n in range(4) for k in range(4) if n != k) / 12
            direct.append(2 * fit - spread)
        assert float(energy_loss(x, y, beta)) == pytest.approx(sum(direct) / 3, rel=1e-5)


def test_energy_loss_is_minimised_by_the_true_distribution():
    g = torch.Generator().manual_seed(0)
    target = lambda n: torch.randn(n, 2000, 2, generator=g) * torch.tensor([1.0, 0.5]) + 1.0  # noqa: E731
    y = target(64)
    true = float(energy_loss(target(16), y))
    for wrong in (target(16) * 0.5 + 0.5,  # too narrow
                  target(16) + 0.3,  # shifted
                  torch.ones(16, 2000, 2),  # the mean only (a point mass)
                  target(16) * 1.6 - 0.6):  # too wide
        assert float(energy_loss(wrong, y)) > true + 0.01


def test_energy_head_output_is_zero_initialised_and_gets_gradients():
    head = EnergyHead(hidden_size=16, latent_size=8, noise_size=8, num_blocks=2)
    h = torch.randn(3, 5, 16)
    x = head(h, num_samples=4)
    assert x.shape == (4, 3, 5, 8)
    assert torch.count_nonzero(x) == 0
    energy_loss(x.flatten(1, 2), torch.randn(10, 15, 8)).backward()
    assert head.out[-1].weight.grad.abs().sum() > 0


def _ae(vocab=40, K=4, seed=0):
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig(vocab_size=vocab, patch_size=K, hidden_size=32, intermediate_size=64, latent_size=8))


def test_autoencoder_round_trip_on_a_tiny_model(tmp_path):
    ae = _ae()
    chunks = torch.randint(0, 40, (128, 4), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-2)
    ae.train()
    for _ in range(400):
        loss = ae.loss(chunks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert token_accuracy(ae, chunks) >= 0.995
    assert token_accuracy(ae, chunks, noise=0.3) > 0.9
    # mask id for token dropout is a dedicated row, never a real token
    assert ae.config.mask_id == 40 and ae.embed.num_embeddings == 41
    ae.save(tmp_path / "ae")
    again = Autoencoder.load(tmp_path / "ae")
    assert torch.equal(again.decode_tokens(again.encode(chunks)[0]), ae.eval().decode_tokens(ae.encode(chunks)[0]))


def _calm(ae, **kw):
    cfg = CALMConfig(vocab_size=ae.config.vocab_size, patch_size=ae.config.patch_size, latent_size=ae.config.latent_size,
                     hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=64, noise_size=8, num_samples=4, num_target_samples=10, eos_token_id=0, **kw)
    return CALM(cfg, ae)


def test_calm_loss_trains_only_lm_parts_and_round_trips(tmp_path):
    ae = _ae()
    model = _calm(ae)
    ids = torch.randint(0, 40, (2, 16))
    loss = model.loss(ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.head.out[-1].weight.grad.abs().sum() > 0
    model.save(tmp_path / "m")
    again = CALM.load(tmp_path / "m")
    torch.manual_seed(1)
    a = model.loss(ids)
    torch.manual_seed(1)
    assert again.loss(ids).item() == pytest.approx(a.item(), rel=1e-5)


def test_autoencoder_with_other_k_or_vocabulary_is_a_clear_error(tmp_path):
    model = _calm(_ae())
    model.save(tmp_path / "m")
    _ae(vocab=41).save(tmp_path / "v")
    Autoencoder(AutoencoderConfig(vocab_size=40, patch_size=2, hidden_size=32, intermediate_size=64, latent_size=8)).save(tmp_path / "k")
    with pytest.raises(CelerisError, match="vocabulary"):
        CALM.load(tmp_path / "m", tmp_path / "v")
    with pytest.raises(CelerisError, match="K"):
        CALM.load(tmp_path / "m", tmp_path / "k")


def _toy_draw(p: torch.Tensor, g: torch.Generator):
    def draw(m):
        return [(int(i),) for i in torch.multinomial(p, m, replacement=True, generator=g)]
    return draw


def test_exact_sampler_at_half_temperature_matches_p_squared():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 6000
    counts = Counter(exact_temperature_sample(_toy_draw(p, g), 0.5, g)[0][0] for _ in range(n))
    freq = torch.tensor([counts[i] / n for i in range(4)])
    target = p**2 / (p**2).sum()
    assert torch.allclose(freq, target, atol=0.02), (freq, target)


def test_exact_sampler_fractional_temperature_matches_p_to_the_one_over_t():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.6, 0.3, 0.1])
    n = 6000
    counts = Counter(exact_temperature_sample(_toy_draw(p, g), 1 / 1.5, g)[0][0] for _ in range(n))
    freq = torch.tensor([counts[i] / n for i in range(3)])
    target = p**1.5 / (p**1.5).sum()
    assert torch.allclose(freq, target, atol=0.02), (freq, target)


def test_batch_sampler_sharpens_towards_p_squared():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 2000
    counts = Counter(batch_temperature_sample(_toy_draw(p, g), 0.5, 200, g)[0][0] for _ in range(n))
    freq = torch.tensor([counts[i] / n for i in range(4)])
    assert torch.allclose(freq, p**2 / (p**2).sum(), atol=0.03)


@pytest.mark.parametrize("temperature,sampler", [(0.0, "exact"), (1.5, "exact"), (-1, "batch"), (0.4, "batch")])
def test_temperature_outside_the_domain_is_a_clear_error(temperature, sampler):
    g = torch.Generator()
    fn = exact_temperature_sample if sampler == "exact" else batch_temperature_sample
    with pytest.raises(CelerisError, match="temperature"):
        fn(_toy_draw(torch.tensor([1.0]), g), temperature)


class _CharTok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 39 for c in text]}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("n", [1, 4, 9, 13])
def test_generation_takes_ceil_n_over_k_steps(n):
    model = _calm(_ae()).eval()
    for sampler, t in (("batch", 1.0), ("batch", 0.5), ("exact", 1.0)):
        r = calm_generate(model, _CharTok(), "hello world", max_new_tokens=n, temperature=t, sampler=sampler, num_samples=16)
        assert r.steps == math.ceil(n / 4) and r.new_tokens == n


def test_generation_rejects_prompt_shorter_than_k():
    with pytest.raises(CelerisError, match="fewer than K"):
        calm_generate(_calm(_ae()), _CharTok(), "abc", max_new_tokens=4)


def test_calm_brier_samples_shapes():
    from celeris.metrics import brier_two_sample

    model = _calm(_ae()).eval()
    ids = torch.randint(0, 40, (3, 16))
    x1, x2, y = model.brier_samples(ids)
    assert x1.shape == x2.shape == y.shape == (3 * 3, 4)
    assert torch.equal(y, ids.view(3, 4, 4)[:, 1:].reshape(-1, 4))
    s = brier_two_sample(x1, x2, y)
    assert s.shape == (9, 4) and (s <= 2).all() and (s >= -1).all()


def _noise_free(model):
    """Zero the head's noise path (a sample then depends on the context alone) and give it a non-zero output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for prm in model.head.parameters():  # random, not zero-initialised, so the context shows
            if prm.ndim == 2:
                prm.copy_(torch.randn(prm.shape, generator=g) / prm.shape[1] ** 0.5 * 2)
        for prm in model.head.embed_noise.parameters():
            prm.zero_()
    return model.eval()


def test_rollout_samples_equal_teacher_forced_samples_when_one_chunk_covers_the_ngram():
    model = _noise_free(_calm(_ae()))
    ids = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))
    r1, r2, ry = model.brier_rollout_samples(ids, 4, batch=2)  # ordered by position, then row
    t1, _, ty = model.brier_samples(ids)  # ordered by row, then position
    by_position = lambda t: t.view(3, 3, 4).transpose(0, 1).reshape(-1, 4)  # noqa: E731
    assert torch.equal(r1, r2) and torch.equal(ry, by_position(ty)) and torch.equal(r1, by_position(t1))
    assert len(set(map(tuple, r1.tolist()))) > 1  # not a constant head: the comparison means something


def test_rollouts_for_k_below_4_feed_back_their_own_chunks():
    from transformers import DynamicCache

    model = _noise_free(_calm(_ae(K=2)))
    seen = []  # every context the head is asked about, to compare at float precision (tokens are coarse)
    head_forward = model.head.forward
    model.head.forward = lambda h, n=1, g=None: (seen.append(h.detach().clone()), head_forward(h, n, g))[1]
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    x1, x2, y = model.brier_rollout_samples(ids, 4)
    chunks = ids.view(2, 8, 2)
    positions = [2, 4, 6]  # every 2 chunks (4 tokens), leaving room for 2 sampled chunks
    assert x1.shape == y.shape == (2 * len(positions), 4) and torch.equal(x1, x2)
    assert len(set(map(tuple, x1.tolist()))) > 1 and len(seen) == 2 * len(positions)
    for j, p in enumerate(positions):
        ctx, drawn = chunks[:, :p], []
        for r in range(2):  # recomputed from scratch, no cache: checks the roll-out's cache and positions
            h, _ = model.hidden_states(ctx, DynamicCache(), 0)
            torch.testing.assert_close(seen[2 * j + r][:2], h[:, -1:], atol=1e-6, rtol=1e-5)
            tok = model.autoencoder.decode_tokens(head_forward(h[:, -1:], 1)[0])
            drawn.append(tok)
            ctx = torch.cat([ctx, tok], 1)
        assert torch.equal(x1[2 * j : 2 * j + 2], torch.cat(drawn, 1).flatten(1))
        assert torch.equal(y[2 * j : 2 * j + 2], ids[:, 2 * p : 2 * p + 4])
    with pytest.raises(CelerisError, match="too short"):
        _calm(_ae(K=2)).brier_rollout_samples(ids[:, :4], 4)
    with pytest.raises(CelerisError, match="too short"):  # 6 one-token chunks: no position has 4 before and after
        _calm(_ae(K=1)).brier_rollout_samples(ids[:, :6], 4)
    noisy = _calm(_ae(K=2)).eval()
    with torch.no_grad():
        noisy.head.out[-1].weight.normal_(0, 2.0)
    a, b, _ = noisy.brier_rollout_samples(ids, 4, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)  # the two roll-outs are independent draws


def _run_cli(args):
    from click.testing import CliRunner

    from celeris.cli import cli

    return CliRunner().invoke(cli, args)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from celeris.cli import main

    model = _calm(_ae())
    model.save(tmp_path / "m")
    _ae(vocab=41).save(tmp_path / "v")
    for args, needle in ((["calm", "generate", "--model", str(tmp_path / "m"), "--prompt", "x", "-t", "0.4"], "1/temperature"),
                         (["calm", "generate", "--model", str(tmp_path / "m"), "--prompt", "x", "-t", "2"], "temperature must be in"),
                         (["calm", "generate", "--model", str(tmp_path / "m"), "--ae", str(tmp_path / "v"), "--prompt", "x"], "vocabulary"),
                         (["brierlm", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "missing.txt")], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_commands_are_registered():
    from celeris.cli import _register_system_commands, cli

    _register_system_commands()  # systems load on first use; the full list loads them all
    assert "brierlm" in cli.commands and "calm" in cli.commands and "calm" in cli.commands["bench"].commands
    assert set(cli.commands["calm"].commands) >= {"train-ae", "eval-ae", "train", "generate"}


def test_shipped_checkpoints_brierlm_and_generate(tmp_path, capsys):
    import json

    from celeris.cli import main

    text = tmp_path / "t.txt"
    text.write_text("import os\n\ndef main(argv):\n    return len(argv)\n" * 20)
    for alias in ("calm:default", "calm:baseline"):
        main(["brierlm", "--model", alias, "--text", str(text), "--block-size", "64", "--max-tokens", "256", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert set(out) >= {"brierlm", "brier", "positions"} and len(out["brier"]) == 4 and out["positions"] > 0
    main(["calm", "generate", "--prompt", "def f(x):\n", "-n", "10", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3 and out["new_tokens"] == 10 and out["tokens_per_second"] > 0
    main(["calm", "eval-ae", "--text", str(text), "--noise", "0.3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["noise"] == 0.3 and out["token_accuracy"] > 0.99


def test_bench_stages_score_each_steps_own_weights_not_the_restored_best(tmp_path):
    """The Trainer's export restores its best checkpoint; a curve point must still be that step's model."""
    from safetensors.torch import load_file

    from celeris.calm.bench import _staged
    from celeris.models import new_model
    from celeris.trainer import TrainConfig, Trainer

    # Train on 0 1 2 3 0 1 ... and validate on 3 2 1 0 3 2 ...: validation loss rises, the best is an early step.
    train = (torch.arange(16)[None] % 4).repeat(64, 1)
    val = (3 - torch.arange(16)[None] % 4).repeat(8, 1)
    model = new_model("nano", vocab_size=16, max_position_embeddings=32, seed=0)

    def make(end: int) -> Trainer:
        cfg = TrainConfig(max_steps=end, eval_every=end, batch_size=8, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                          eval_batches=1, progress=False)
        return Trainer(model, train, val, tmp_path, cfg)

    seen = []
    points = _staged(make, [2, 30], lambda: seen.append({k: v.clone() for k, v in model.state_dict().items()}) or {})
    assert points[1]["step"] == 30
    best = load_file(str(tmp_path / "best.safetensors"))
    last = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    name = next(k for k in last if not torch.equal(last[k], best[k]))  # the best is not the last step here
    assert torch.equal(seen[1][name], last[name])


def test_batch_sampler_returns_the_temperature_it_actually_used():
    distinct = iter(range(10_000))

    def all_distinct(m):
        return [(next(distinct),) for _ in range(m)]

    assert batch_temperature_sample(all_distinct, 0.5, 10)[2] == 1.0  # no chunk repeats: falls back to T = 1
    assert batch_temperature_sample(lambda m: [(7,)] * m, 1 / 3, 10)[2] == pytest.approx(1 / 3)


def test_generation_warns_and_records_a_batch_sampler_fallback():
    # one sample per step can never repeat twice, so every step runs at T = 1 instead of 0.5
    with pytest.warns(UserWarning, match="higher temperature"):
        r = calm_generate(_calm(_ae()).eval(), _CharTok(), "hello world", max_new_tokens=8, temperature=0.5,
                          sampler="batch", num_samples=1)
    d = r.to_dict()
    assert (d["temperature"], d["fallback_steps"], d["highest_temperature_used"]) == (0.5, r.steps, 1.0)
