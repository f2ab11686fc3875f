"""Bad input, driven through the CLI the way a user types it (issue 30).

Each test feeds one family of bad input (untrusted weights, missing tensors, too-long prompts,
unwritable output paths, malformed artefacts, out-of-range options) to every command that takes
it, and pins the promise: one line on stderr starting `error: ` that names the problem, exit code 2,
nothing left behind, and no third-party noise ahead of the message.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from celeris.cli import main
from celeris.errors import CelerisError
from celeris.lm import train_tokenizer
from celeris.models import check_context_limit, new_model, truncate_prompt

CELERIS = str(Path(sys.executable).with_name("celeris"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`celeris ARGV...` in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A 2-layer random Llama saved as a model directory (safetensors + tokenizer), 256-token context."""
    d = tmp_path / "tiny"
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, hello tokens"], vocab_size=300)
    model = new_model("nano", vocab_size=len(tok), max_position_embeddings=256, seed=0)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


# 1. Pickled weights are never loaded.

def test_pickled_weights_are_refused_with_the_safetensors_converter_named(tmp_path, tiny_dir, capsys):
    sd = load_file(tiny_dir / "model.safetensors")
    (tiny_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Evil:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({**sd, "evil": Evil()}, tiny_dir / "pytorch_model.bin")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    for argv in (["generate", "-p", "hi", "-n", "2", "-m", tiny_dir], ["info", "-m", tiny_dir],
                 ["brierlm", "-m", tiny_dir, "--text", text]):
        line = assert_one_line_error(*run_cli(capsys, *argv)[::2], "pickle", "pytorch_model.bin", "safetensors")
        assert "weights_only" not in line and "convert" in line
    assert not marker.exists()
    for name in ("model.pt", "weights.pth", "model.ckpt"):  # every pickle suffix, not only .bin
        (tiny_dir / "pytorch_model.bin").rename(tiny_dir / name)
        assert_one_line_error(*run_cli(capsys, "info", "-m", tiny_dir)[::2], name)
        (tiny_dir / name).rename(tiny_dir / "pytorch_model.bin")
    assert not marker.exists()


def test_a_directory_without_weights_says_so(tiny_dir, capsys):
    (tiny_dir / "model.safetensors").unlink()
    assert_one_line_error(*run_cli(capsys, "info", "-m", tiny_dir)[::2], "no weights", "model.safetensors")


# 2. Missing, unexpected and mis-shaped tensors are errors naming them.

@pytest.mark.parametrize("edit, words", [
    (lambda sd: {k: v for k, v in sd.items() if ".layers.1." not in k}, ["missing", "model.layers.1."]),
    (lambda sd: {**sd, "model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}, ["unexpected", "model.layers.7."]),
    (lambda sd: {**sd, "model.norm.weight": torch.zeros(7)}, ["shape", "model.norm.weight", "(7,)", "(64,)"]),
])
def test_missing_or_unexpected_tensors_are_named(tiny_dir, capsys, edit, words):
    path = tiny_dir / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    for argv in (["generate", "-p", "hi", "-n", "2", "-m", tiny_dir], ["info", "-m", tiny_dir]):
        assert_one_line_error(*run_cli(capsys, *argv)[::2], *words)


def test_config_declaring_more_layers_than_the_weights_hold_is_refused(tiny_dir, capsys):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, "info", "-m", tiny_dir)[::2], "missing", "model.layers.2.")


def test_a_complete_directory_still_loads_and_generates(tiny_dir, capsys):
    code, out, err = run_cli(capsys, "info", "-m", tiny_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["layers"] == 2


# 3. Prompt + new tokens beyond the model's context.

def test_check_context_limit_refuses_prompt_plus_new_tokens_beyond_the_context(tiny_dir):
    cfg = new_model("nano", vocab_size=96, max_position_embeddings=1024).config
    check_context_limit(cfg, 1000, 24)  # exactly the context: fine
    with pytest.raises(CelerisError, match=r"3,000 tokens.*3,004.*context of 1,024"):
        check_context_limit(cfg, 3000, 4)
    with pytest.raises(CelerisError, match="no room for a prompt"):
        check_context_limit(cfg, 1, 1024)
    ids = torch.arange(3000)[None]
    with pytest.raises(CelerisError, match="context"):
        truncate_prompt(ids, cfg, 4)
    kept = truncate_prompt(ids, cfg, 4, side="left")
    assert kept.shape == (1, 1020) and kept[0, -1] == 2999  # the end of the prompt is what stays


# 9. Third-party noise never precedes the message.

def test_no_third_party_warnings_ahead_of_an_error_unless_verbose(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # every warning that would ever show, shown
    env.pop("CELERIS_VERBOSE", None)
    argv = [CELERIS, "bench", "memory", "-t", str(tmp_path / "missing.jsonl")]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr == f"error: task file not found: {tmp_path / 'missing.jsonl'}\n"
    as_module = subprocess.run([sys.executable, "-m", "celeris", *argv[1:]], capture_output=True, text=True, env=env,
                               timeout=120)
    assert as_module.returncode == 2 and as_module.stderr == quiet.stderr
    # Flower's import warns (typer deprecations); systems load on first use, so `federate` is the noisy one now
    fed = [CELERIS, "federate", "simulate", "--clients", "0"]
    quiet = subprocess.run(fed, capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr == "error: --clients must be in [2, 64], got 0\n"
    loud = subprocess.run([CELERIS, "-v", *fed[1:]], capture_output=True, text=True, env=env, timeout=120)
    assert loud.returncode == 2 and "Warning" in loud.stderr and loud.stderr.rstrip().endswith("got 0")


# 8. A GGUF file with a valid magic but garbage after it.

def test_garbage_gguf_with_a_valid_magic_says_it_is_corrupt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CELERIS_CACHE", str(tmp_path / "cache"))
    for i, body in enumerate([struct.pack("<I", 3) + os.urandom(64), struct.pack("<IQQ", 3, 0, 0)]):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(b"GGUF" + body)
        line = assert_one_line_error(*run_cli(capsys, "info", "-m", bad)[::2], str(bad))
        assert "corrupt" in line or "no model" in line or "no tensors" in line
        assert "out of bounds" not in line and "list index" not in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


# 7. An empty model name is not the default model.

def test_empty_model_name_is_an_error_not_the_default(capsys):
    assert_one_line_error(*run_cli(capsys, "info", "-m", "")[::2], "model name is empty")
    assert_one_line_error(*run_cli(capsys, "generate", "-p", "hi", "-m", "  ")[::2], "model name is empty")


# 4. Output paths are checked before any work, for every command that writes one.

def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(60):
        (d / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nclass C{i}:\n    pass\n" * 3)
    return d


# (argv with OUT where the path goes, kind of path). Each would start real work (a model, a corpus,
# a training run) if the path were not checked first.
OUTPUT_COMMANDS = [
    (["train-lm", "-o", "OUT", "--size", "nano", "--corpus", "CORPUS"], "dir"),
    (["drafter", "train", "-o", "OUT"], "dir"),
    (["drafter", "train-assistant", "-o", "OUT"], "dir"),
    (["calm", "train-ae", "-o", "OUT", "--corpus", "CORPUS"], "dir"),
    (["calm", "train", "--ae", "calm:ae", "-o", "OUT"], "dir"),
    (["bench", "calm", "-o", "OUT"], "dir"),
    (["bench", "calm", "--json", "OUT"], "file"),
    (["federate", "simulate", "-o", "OUT", "--corpus", "CORPUS"], "dir"),
    (["federate", "simulate", "--json", "OUT", "--corpus", "CORPUS"], "file"),
    (["tasks", "make", "-o", "OUT"], "file"),
    (["curate", "CORPUS", "-o", "OUT", "--tokenizer", "words"], "dir"),
    (["bench", "speculative", "--json", "OUT"], "file"),
    (["memory", "eval", "-p", "full", "-t", "TASKS", "--json", "OUT"], "file"),
    (["memory", "evolve", "-t", "TASKS", "-o", "OUT"], "dir"),
    (["bench", "memory", "-t", "TASKS", "--json", "OUT"], "file"),
    (["bench", "data", "--json", "OUT"], "file"),
    (["bench", "data", "--report", "OUT"], "file"),
    (["bench", "federated", "--json", "OUT"], "file"),
    (["demo", "-o", "OUT"], "dir"),
]


@pytest.mark.parametrize("argv, kind", OUTPUT_COMMANDS, ids=[" ".join(a[:2]) + f" {k}" for a, k in OUTPUT_COMMANDS])
def test_unusable_output_paths_fail_first_with_one_line(tmp_path, capsys, argv, kind):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"task": "passkey", "context": "x", "input": "y",
                                                      "answers": ["1"], "metric": "exact"}) + "\n")
    subs = {"CORPUS": str(_corpus(tmp_path)), "TASKS": str(tmp_path / "tasks.jsonl")}
    wrong_kind = (tmp_path, "is a directory") if kind == "file" else (blocker, "is a file")
    cases = [(blocker / "out", "is a file"), wrong_kind]
    if Path("/sys").is_dir():
        cases.append((Path("/sys/celeris-out/x"), "not writable"))  # sysfs refuses new files even to root
    before = tree(tmp_path)
    for path, words in cases:
        args = [str(path) if a == "OUT" else subs.get(a, a) for a in argv]
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, str(path), words)
    assert tree(tmp_path) == before and blocker.read_text() == "keep me"


def test_results_that_cannot_be_written_late_are_saved_where_the_error_says(tmp_path):
    from celeris.io import check_output_path, save_results

    target = tmp_path / "gone" / "results.json"
    check_output_path(target)  # fine up front ...
    (tmp_path / "gone").write_text("... but a file took the folder's place during the run")
    with pytest.raises(CelerisError, match=r"could not write results to .*saved to (\S+\.json)") as exc:
        save_results(target, {"tokens_per_second": 42.0})
    saved = Path(str(exc.value).rsplit("saved to ", 1)[1])
    assert json.loads(saved.read_text()) == {"tokens_per_second": 42.0}
    saved.unlink()


# 5. Options are validated before the disk is touched; an interrupted set-up resumes or is cleaned up.

@pytest.mark.parametrize("extra, words", [(["--size", "huge"], "unknown model size 'huge'"),
                                          (["--lr", "nan"], "not a finite number"),
                                          (["--lr", "inf"], "not a finite number"),
                                          (["--min-delta", "nan"], "not a finite number"),
                                          (["--vocab-size", "100"], "vocab-size")])
def test_train_lm_rejects_options_before_creating_its_folder(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train-lm", "-o", out, "--corpus", _corpus(tmp_path), *extra)
    assert_one_line_error(code, err, words)
    assert not out.exists()


def test_train_lm_interrupted_in_the_tokenizer_step_leaves_nothing_and_a_killed_one_resumes(tmp_path, capsys,
                                                                                             monkeypatch):
    import celeris.lm as lm

    out, corpus = tmp_path / "run", _corpus(tmp_path)
    argv = ["train-lm", "-o", out, "--corpus", corpus, "--size", "nano", "--vocab-size", "300", "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "2", "--eval-every", "2"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(lm, "train_tokenizer", interrupted)
        code, _, err = run_cli(capsys, *argv)
    assert code == 130 and not out.exists()
    # A run killed (SIGKILL: no clean-up) in the same step leaves only its marker: the command resumes it.
    out.mkdir()
    (out / lm.RUN_MARKER).touch()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    # --overwrite replaces runs only, never a folder of someone else's files.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "train-lm", "-o", foreign, "--corpus", corpus, "--overwrite")
    assert_one_line_error(code, err, "not a Celeris training run")
    assert (foreign / "notes.txt").read_text() == "keep me"


def _interrupt(*a, **k):
    raise KeyboardInterrupt


def _refuses_foreign_folder(tmp_path, capsys, argv: list, out, *extra: str) -> None:
    """`argv` (with `out` as its --out) and `extra` run on a folder of someone else's files."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *[foreign if a == out else a for a in argv], *extra)
    assert_one_line_error(code, err, "not a Celeris training run")
    assert tree(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"


def test_drafter_train_checks_options_first_and_an_interrupted_distillation_leaves_nothing_or_resumes(
        tmp_path, tiny_dir, capsys, monkeypatch):
    import celeris.speculative.train as st
    from celeris.io import RUN_MARKER

    out = tmp_path / "run"
    argv = ["drafter", "train", "-o", out, "-m", tiny_dir, "--max-prompts", "8", "--max-new-tokens", "8",
            "--gen-batch-size", "8", "--draft-vocab-size", "16", "--batch-size", "4", "--max-steps", "2",
            "--eval-every", "2"]
    for bad, words in ((["-m", tmp_path / "no-model"], "no-model"), (["--lr", "nan"], "finite")):
        assert_one_line_error(*run_cli(capsys, *argv, *bad)[::2], words)
        assert not out.exists()
    # Ctrl-C before the first distilled shard: the folder this command created goes away.
    with monkeypatch.context() as m:
        m.setattr(st, "distill_data", _interrupt)
        assert run_cli(capsys, *argv)[0] == 130
    assert not out.exists()
    # Ctrl-C after the training shard: the folder stays, and the same command resumes from it.
    real, calls = st.distill_data, []

    def second_call_interrupted(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else _interrupt()

    with monkeypatch.context() as m:
        m.setattr(st, "distill_data", second_call_interrupted)
        assert run_cli(capsys, *argv)[0] == 130
    assert list((out / "data").glob("train-*.safetensors"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / "drafter" / "drafter.json").is_file()
    # A run killed (SIGKILL: no clean-up) before its first shard leaves only its marker: it resumes too.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / RUN_MARKER).touch()
    code, _, err = run_cli(capsys, *[killed if a == out else a for a in argv])
    assert code == 0, err
    _refuses_foreign_folder(tmp_path, capsys, argv, out)  # (it has no --overwrite)


def test_calm_train_ae_checks_options_first_and_an_interrupted_set_up_leaves_nothing_or_resumes(tmp_path, capsys,
                                                                                               monkeypatch):
    import celeris.calm.train as ct
    from celeris.io import RUN_MARKER

    out = tmp_path / "ae"
    argv = ["calm", "train-ae", "-o", out, "--corpus", _corpus(tmp_path), "--vocab-size", "300", "--hidden", "8",
            "--latent", "2", "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--eval-every", "2",
            "--max-train-tokens", "1000"]
    # K = 64 needs blocks of 4096 tokens, more validation text than the corpus has.
    assert_one_line_error(*run_cli(capsys, *argv, "--k", "64")[::2], "too little validation text")
    assert not out.exists()
    with monkeypatch.context() as m:  # Ctrl-C while the model is built, after the tokenizer
        m.setattr(ct, "Autoencoder", _interrupt)
        assert run_cli(capsys, *argv)[0] == 130
    assert not out.exists()
    # A run killed (SIGKILL: no clean-up) in the set-up leaves only its marker: the same command resumes it,
    out.mkdir()
    (out / RUN_MARKER).touch()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / "log.jsonl").is_file() and (out / "tokenizer.json").is_file()
    # and --overwrite with a rejected option leaves the finished run as it was.
    before = tree(out)
    assert_one_line_error(*run_cli(capsys, *argv, "--k", "64", "--overwrite")[::2], "too little validation text")
    assert tree(out) == before
    _refuses_foreign_folder(tmp_path, capsys, argv, out, "--overwrite")  # which only ever replaces a run


def test_calm_train_checks_options_first_and_an_interrupted_set_up_leaves_nothing_or_resumes(tmp_path, capsys,
                                                                                            monkeypatch):
    import celeris.calm.train as ct
    from celeris.io import RUN_MARKER

    ae, corpus = tmp_path / "ae", _corpus(tmp_path)
    code, _, err = run_cli(capsys, "calm", "train-ae", "-o", ae, "--corpus", corpus, "--vocab-size", "300", "--hidden", "8",
                           "--latent", "2", "--max-steps", "1", "--batch-size", "4", "--warmup-steps", "0",
                           "--eval-every", "1", "--max-train-tokens", "1000")
    assert code == 0, err
    out = tmp_path / "calm"
    argv = ["calm", "train", "--ae", ae, "-o", out, "--corpus", corpus, "--hidden", "8", "--layers", "1", "--heads", "1",
            "--samples", "2", "--target-samples", "2", "--seq-len", "16", "--max-steps", "2", "--batch-size", "2",
            "--warmup-steps", "1", "--eval-every", "2", "--max-train-tokens", "1000"]
    assert_one_line_error(*run_cli(capsys, *argv, "--seq-len", "10")[::2], "multiple of K = 4")
    assert not out.exists()
    with monkeypatch.context() as m:  # Ctrl-C while the trainer is set up
        m.setattr(ct, "Trainer", _interrupt)
        assert run_cli(capsys, *argv)[0] == 130
    assert not out.exists()
    # A run killed (SIGKILL: no clean-up) in the set-up leaves only its marker: the same command resumes it,
    out.mkdir()
    (out / RUN_MARKER).touch()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / "log.jsonl").is_file() and (out / "config.json").is_file()
    # and --overwrite with a rejected option leaves the finished run as it was.
    before = tree(out)
    assert_one_line_error(*run_cli(capsys, *argv, "--seq-len", "10", "--overwrite")[::2], "multiple of K = 4")
    assert tree(out) == before
    _refuses_foreign_folder(tmp_path, capsys, argv, out, "--overwrite")  # which only ever replaces a run


# 6. Malformed artefacts and values.

@pytest.fixture
def drafter_dir(tmp_path, tiny_dir) -> Path:
    from celeris.models import load_model
    from celeris.speculative.drafter import new_drafter

    model, _ = load_model(str(tiny_dir))
    d = tmp_path / "drafter"
    new_drafter(model, torch.arange(0, 64), seed=1).save(d)
    return d


@pytest.mark.parametrize("field, value, words", [
    ("draft_vocab_size", 32, ["draft_vocab_size 32", "64"]),
    ("draft_vocab_size", "64", ["draft_vocab_size", "integer"]),
    ("num_layers", 3, ["blocks.", "missing"]),
    ("exit_dim", 10**9, ["shape"]),
    ("hidden_size", None, ["hidden_size"]),
])
def test_edited_drafter_config_is_refused_with_the_field_named(tmp_path, tiny_dir, drafter_dir, capsys, field, value,
                                                               words):
    meta = json.loads((drafter_dir / "drafter.json").read_text())
    meta[field] = value
    (drafter_dir / "drafter.json").write_text(json.dumps(meta))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    code, _, err = run_cli(capsys, "bench", "speculative", "-m", tiny_dir, "--drafter", drafter_dir, "--prompts", prompts,
                           "-n", "4", "--repeats", "1", "--configs", "1x2", "--device", "cpu")
    assert_one_line_error(code, err, *words)


@pytest.mark.parametrize("line, words", [({"messages": [{"role": "user"}]}, ["message 1", "'content'"]),
                                         ({"messages": [{"content": "hi"}]}, ["message 1", "'role'"]),
                                         ({"messages": ["hi"]}, ["message 1"])])
def test_prompt_file_messages_need_role_and_content(tmp_path, capsys, line, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    code, _, err = run_cli(capsys, "bench", "speculative", "--prompts", prompts, "-m", tmp_path / "never-loaded")
    assert_one_line_error(code, err, f"{prompts}:2", *words)


def test_temperatures_and_other_floats_must_be_finite(tmp_path, capsys):
    from celeris.validate import check_temperature

    for bad in ("nan", "inf", "-1"):
        with pytest.raises(CelerisError, match="--temperature"):
            check_temperature(float(bad))
    assert check_temperature(0.0) == 0.0 and check_temperature(0.7) == 0.7
    for argv in (["calm", "generate", "-p", "x", "-t", "nan"], ["federate", "simulate", "--drop", "nan"],
                 ["curate", "x", "-o", tmp_path / "o", "--threshold", "inf"], ["memory", "evolve", "-t", "x", "-o",
                 tmp_path / "e", "--sigma", "inf"], ["drafter", "train", "-o", tmp_path / "d", "--lr", "nan"]):
        assert_one_line_error(*run_cli(capsys, *argv)[::2], "finite")


# 7. Unbounded or silently ignored options: bounds, and errors that list the valid names.

def test_engine_options_without_their_engine_are_refused():
    from celeris.validate import check_engine_options

    check_engine_options(None, None)
    check_engine_options("default", None, beam_width=2, beam_length=3)
    check_engine_options(None, "h2o", budget="0.5")
    with pytest.raises(CelerisError, match="--beam-width applies only with --drafter"):
        check_engine_options(None, None, beam_width=0)
    with pytest.raises(CelerisError, match="--beam-length applies only with --drafter"):
        check_engine_options(None, "h2o", beam_length=4)
    with pytest.raises(CelerisError, match="--budget applies only with --memory"):
        check_engine_options("default", None, budget="-7")


def test_unbounded_lengths_and_unknown_names_are_refused(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert_one_line_error(*run_cli(capsys, "tasks", "make", "-o", out, "--lengths", "1000000000")[::2], "at most 131,072")
    assert not out.exists()
    assert_one_line_error(*run_cli(capsys, "bench", "speculative", "--engines", "bogus,celeris-plain")[::2],
                          "'bogus'", "valid:", "hf-prompt-lookup", "redrafter-w1-l6-adaptive")
    assert_one_line_error(*run_cli(capsys, "demo", "-o", tmp_path / "d", "--only", "bogus")[::2],
                          "'bogus'", "valid:", "generation", "training")
    assert not (tmp_path / "d").exists()
    for budget in ("inf", "nan", "-7"):
        assert_one_line_error(*run_cli(capsys, "memory", "eval", "-p", "h2o", "-b", budget, "-t", tmp_path / "x")[::2],
                              "budget")


# 8. Errors that say what differs.

def test_a_corpus_of_only_undecodable_files_says_they_were_skipped(tmp_path, capsys):
    d = tmp_path / "latin1"
    d.mkdir()
    (d / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "b.txt").write_bytes(b"\xff\xfe bad")
    for argv in (["data", "stats", d, "--tokenizer", "none"], ["curate", d, "-o", tmp_path / "o", "--tokenizer", "words"],
                 ["train-lm", "-o", tmp_path / "r", "--corpus", d]):
        assert_one_line_error(*run_cli(capsys, *argv)[::2], "no documents", "2 file(s) skipped", "not UTF-8")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


# New bad inputs found while hardening (not in the list), each pinned once.

def test_new_bad_inputs_found_while_hardening(tmp_path, tiny_dir, capsys):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    bad_cfg = tmp_path / "negctx"
    bad_cfg.mkdir()
    for f in tiny_dir.iterdir():
        (bad_cfg / f.name).write_bytes(f.read_bytes())
    (bad_cfg / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": -1}))
    assert_one_line_error(*run_cli(capsys, "info", "-m", bad_cfg)[::2], "max_position_embeddings -1")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    assert_one_line_error(*run_cli(capsys, "info", "-m", loop)[::2], "broken symbolic link")
    assert_one_line_error(*run_cli(capsys, "tasks", "make", "-o", tmp_path / "t.jsonl", "--lengths", ",")[::2],
                          "--lengths needs at least one value")
    corpus = _corpus(tmp_path)
    assert_one_line_error(*run_cli(capsys, "curate", corpus, "-o", tmp_path / "c", "--ngram", "-1",
                                   "--tokenizer", "words")[::2], "--ngram", "-1")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task": "passkey", "context": "x", "input": "y", "answers": ["1"]}) + "\n")
    before = tasks.read_text()
    for cmd in (["memory", "eval", "-p", "full"], ["bench", "memory"]):
        assert_one_line_error(*run_cli(capsys, *cmd, "-t", tasks, "--json", tasks)[::2], "also an input")
    assert tasks.read_text() == before
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 400)
    assert_one_line_error(*run_cli(capsys, "brierlm", "-m", tiny_dir, "--text", text, "--block-size", "512")[::2],
                          "block_size 512", "context of 256")
    assert_one_line_error(*run_cli(capsys, "memory", "eval", "-p", "full", "-t", tasks, "-m", tiny_dir,
                                   "--max-new-tokens", "300")[::2], "sample 1", "context of 256")
