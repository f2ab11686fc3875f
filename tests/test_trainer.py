"""The shared trainer: learning, early stopping, exact resume after a kill, FLOPs accounting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from celeris.compute import count_parameters, training_flops_per_token
from celeris.errors import CelerisError
from celeris.models import new_model
from celeris.trainer import TrainConfig, Trainer, read_log

SEQ = 16


def _data(n: int, seed: int) -> torch.Tensor:
    """Sequences with learnable structure: arithmetic progressions mod 96."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 96, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % 96


def _trainer(out: Path, **cfg) -> Trainer:
    model = new_model("nano", vocab_size=96, max_position_embeddings=64, seed=0)
    base = dict(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2, progress=False)
    config = TrainConfig(**{**base, **cfg})
    return Trainer(model, _data(256, 0), _data(32, 1), out, config, flops_per_token=training_flops_per_token(model, SEQ))


def test_validation_loss_decreases(tmp_path):
    res = _trainer(tmp_path / "run", max_steps=60).train()
    vals = [h["val_loss"] for h in res.history]
    assert res.stop_reason == "max_steps" and res.steps == 60
    assert vals[-1] < vals[0] - 1.0, vals
    # The exported model is the best checkpoint and loads through Celeris and plain transformers.
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert torch.equal(m.state_dict()["model.norm.weight"], best["model.norm.weight"])


def test_early_stopping_stops_after_patience_checks(tmp_path):
    # min_delta larger than any possible gain: every check after the first counts as "no improvement".
    res = _trainer(tmp_path / "run", max_steps=400, patience=2, min_delta=100.0).train()
    assert res.stop_reason == "early_stopping"
    assert res.steps == 30  # first check at 10 sets the best, 20 and 30 do not improve
    assert res.best_step == 10
    events = [e["event"] for e in read_log(tmp_path / "run")]
    assert events[0] == "start" and events[-1] == "end"


def test_flops_match_six_n_d_for_a_known_model(tmp_path):
    model = new_model("nano", vocab_size=96)
    # nano: 2 layers, d=64, 4 heads x 16, 2 KV heads, MLP 192, tied embeddings (excluded).
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192 + 2 * 64
    n = 2 * per_layer + 64
    assert count_parameters(model) == n == 98_624
    res = _trainer(tmp_path / "run", max_steps=7).train()
    d = 7 * 8 * SEQ
    assert res.tokens == d
    assert res.flops_dense == pytest.approx(6 * n * d)
    assert res.flops_attention == pytest.approx(3 * 2 * 2 * SEQ * 64 * d)
    # Frozen weights get no weight gradient: 4·N + 2·N_trainable.
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    assert training_flops_per_token(model, SEQ).dense == 4 * n + 2 * (n - per_layer)


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_trainer as t
    from celeris.trainer import causal_lm_loss
    tr = t._trainer(__import__("pathlib").Path({out!r}), max_steps=60, save_every=5, log_every=1)
    calls = 0
    def pausing_loss(model, batch):
        global calls
        calls += model.training  # validation calls the loss too, in eval mode
        if model.training and calls == {pause_at}:  # {pause_at} - 1 steps are done: say so, wait for the parent
            print("paused", flush=True)
            sys.stdin.readline()
        return causal_lm_loss(model, batch)
    tr.loss_fn = pausing_loss
    tr.train()
    """
)


def _spawn_paused(out: Path, finished_steps: int) -> subprocess.Popen:
    """A training run in a child process, stopped (inside its loss) once `finished_steps` steps are done.

    It says so on stdout, so the test waits on that line instead of polling with sleeps and a deadline;
    a line on its stdin lets it go on."""
    code = _SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), pause_at=finished_steps + 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the child pauses, or gives "" if it died first
    assert line == "paused\n", proc.communicate()[1]
    return proc


def test_killed_run_resumes_to_identical_weights(tmp_path):
    torch.set_num_threads(1)
    reference = _trainer(tmp_path / "ref", max_steps=60, save_every=5)
    reference.train()
    ref = {k: v.clone() for k, v in reference.model.state_dict().items()}

    proc = _spawn_paused(tmp_path / "killed", finished_steps=12)  # past the step-10 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["state"]["step"]
    assert saved == 10  # the last periodic checkpoint; steps 11 and 12 are lost with the process
    resumed = _trainer(tmp_path / "killed", max_steps=60, save_every=5)
    res = resumed.train()
    assert res.steps == 60
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    steps = [e["step"] for e in read_log(tmp_path / "killed") if e["event"] == "val"]
    assert steps == sorted(set(steps))  # no validation record duplicated by the resume


def test_sigterm_checkpoints_every_finished_step(tmp_path):
    out = tmp_path / "run"
    proc = _spawn_paused(out, finished_steps=8)  # 3 steps past the step-5 checkpoint
    proc.send_signal(signal.SIGTERM)  # pending before the child reads the line below: the step it is in is its last
    _, err = proc.communicate("go\n")
    assert proc.returncode == 0, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())["state"]
    last_logged = max(e["step"] for e in read_log(out) if e["event"] == "train")
    assert state["step"] == last_logged == 9  # not a multiple of save_every: saved because of the signal


def test_an_interrupted_run_stops_a_chain_of_runs(tmp_path):
    """Benches chain runs: SIGTERM in one must stop the command, not start the next run half-trained."""
    trainer = _trainer(tmp_path / "run", max_steps=40)
    calls = {"n": 0}

    def loss_then_sigterm(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the Trainer, which checkpoints and returns
        return model(input_ids=batch, labels=batch).loss

    trainer.loss_fn = loss_then_sigterm
    res = trainer.train()
    assert res.stop_reason == "interrupted" and res.steps == 3
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        res.raise_if_interrupted()
    done = _trainer(tmp_path / "run", max_steps=5).train()  # resumes from step 3, then finishes
    assert done.raise_if_interrupted() is done and done.steps == 5


def test_resume_refuses_a_checkpoint_for_other_settings(tmp_path):
    _trainer(tmp_path / "run", max_steps=10).train()
    with pytest.raises(CelerisError, match="written for other data or settings"):
        _trainer(tmp_path / "run", max_steps=20, batch_size=4).train()


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run", max_steps=10)
    tr.train()
    before = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    import celeris.trainer as trainer_mod

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trainer_mod, "save_tensors", fail)
    tr.state["step"] = 11
    with pytest.raises(OSError):
        tr.save_checkpoint()
    assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == before
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(CelerisError, match="batch_size"):
        _trainer(tmp_path / "r", batch_size=0)
    with pytest.raises(CelerisError, match="patience"):
        _trainer(tmp_path / "r", patience=0)


def test_sharded_launches_are_refused_until_checkpoints_gather_the_shards(tiny_llama, tmp_path, monkeypatch):
    """Under FSDP the main process's weights are a shard: saving them would write a broken checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(CelerisError, match="FSDP-sharded"):
        Trainer(tiny_llama.train(), _data(8, 0), None, tmp_path / "run", TrainConfig(max_steps=1, batch_size=4, progress=False))
    assert not (tmp_path / "run").exists()
