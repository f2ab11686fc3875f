"""`celeris train-lm` under `accelerate launch` with two CPU processes (gloo) against one process.

Each run is a real subprocess on a tiny corpus and a nano model. On CPU, accelerate's `--cpu
--num_processes 2` without an MPI hostfile starts *one* process; `--multi_gpu` is its torchrun path,
which the trainer turns into gloo when there is no CUDA.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from celeris.trainer import read_log

pytestmark = pytest.mark.slow

ARGS = ["--size", "nano", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2",
        "--eval-every", "10", "--log-every", "1", "--max-train-tokens", "20000"]
LAUNCH_2 = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "celeris", "train-lm"]
LAUNCH_1 = [sys.executable, "-m", "celeris", "train-lm"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """80 small text documents of seeded random words (enough to hold out a few for validation)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "index", "list", "for", "in", "if", "else", "None", "True", "print",
             "import", "class", "data", "len", "range", "while", "yield"]
    for i in range(80):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(30)]
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


def _train(launch: list[str], out: Path, corpus: Path, max_steps: int) -> list[dict]:
    cmd = [*launch, "--out", str(out), "--corpus", str(corpus), "--max-steps", str(max_steps), *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_log(out)


def _losses(log: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log if r["event"] == "train"}


def _assert_same_curve(a: list[dict], b: list[dict], steps: range) -> None:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(steps)
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=1e-3), step
    assert len({la[s] for s in steps}) > 1  # the loss moves: a frozen model would pass the comparison


def test_two_processes_give_the_one_process_loss_curve_and_count_the_job_once(corpus, tmp_path):
    one = _train(LAUNCH_1, tmp_path / "one", corpus, 20)
    two = _train(LAUNCH_2, tmp_path / "two", corpus, 20)
    _assert_same_curve(one, two, range(1, 21))
    # The log is written once: one start, one end, one train record per step (two writers would double them).
    assert [r["event"] for r in two].count("start") == 1 and [r["event"] for r in two].count("end") == 1
    assert len([r for r in two if r["event"] == "train"]) == 20
    # FLOPs and tokens are the whole job's, once: 20 steps × 4 blocks × 32 tokens, as one process counts them.
    end1, end2 = one[-1], two[-1]
    assert end2["tokens"] == end1["tokens"] == 20 * 4 * 32
    assert end2["flops"] == end1["flops"] > 0
    vals = [(r["val_loss"], s["val_loss"]) for r, s in zip([r for r in one if r["event"] == "val"],
                                                            [r for r in two if r["event"] == "val"], strict=True)]
    assert all(v2 == pytest.approx(v1, rel=1e-3) for v1, v2 in vals)
    # One checkpoint and one exported model, no half-written folder left by a second writer.
    out = tmp_path / "two"
    assert (out / "checkpoint" / "state.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]


def test_a_run_resumes_under_another_process_count(corpus, tmp_path):
    """10 steps in one process, then 10 more under two, match the same resume done in one process."""
    _train(LAUNCH_1, tmp_path / "a", corpus, 10)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ref = _train(LAUNCH_1, tmp_path / "a", corpus, 20)
    two = _train(LAUNCH_2, tmp_path / "b", corpus, 20)
    _assert_same_curve(ref, two, range(1, 21))
    assert two[-1]["tokens"] == ref[-1]["tokens"] and two[-1]["flops"] == ref[-1]["flops"]


def test_a_batch_the_processes_cannot_share_is_refused_before_any_work(corpus, tmp_path):
    cmd = [*LAUNCH_2, "--out", str(tmp_path / "odd"), "--corpus", str(corpus), "--max-steps", "2", *ARGS[:6],
           "--batch-size", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "batch_size 5 does not split evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "odd").exists()
