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
    loud = subprocess.run([CELERIS, "-v", *argv[1:]], capture_output=True, text=True, env=env, timeout=120)
    assert loud.returncode == 2 and "Warning" in loud.stderr and loud.stderr.rstrip().endswith("missing.jsonl")


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
