"""`celeris train-lm` end to end, the CLI's commands and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from celeris.cli import main
from celeris.lm import token_blocks, train_lm, train_tokenizer
from celeris.models import load_model
from celeris.trainer import TrainConfig


def _run(argv, capsys):
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(60):
        (d / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nclass C{i}:\n    pass\n" * 3)
    return d


def test_token_blocks_concatenate_documents_with_eos():
    tok = train_tokenizer(["aaa bbb ccc " * 50], vocab_size=280)
    blocks = token_blocks(["aaa", "bbb ccc"], tok, seq_len=2)
    flat = blocks.flatten().tolist()
    assert tok.eos_token_id in flat and blocks.shape[1] == 2


def test_train_lm_from_scratch_saves_a_loadable_model(tmp_path):
    cfg = TrainConfig(max_steps=12, batch_size=4, eval_every=6, eval_batches=1, warmup_steps=2, progress=False)
    res = train_lm(tmp_path / "run", corpus=str(_corpus(tmp_path)), size="nano", vocab_size=300, seq_len=32, config=cfg)
    assert res.steps == 12 and res.flops > 0 and len(res.history) == 2
    model, tok = load_model(str(tmp_path / "run"))
    assert model.config.vocab_size == len(tok) == 300
    assert model.config.eos_token_id == tok.eos_token_id
    # Running the same command again resumes (nothing left to do) instead of starting over.
    again = train_lm(tmp_path / "run", corpus=str(_corpus(tmp_path)), size="nano", vocab_size=300, seq_len=32, config=cfg)
    assert again.steps == 12


def test_train_lm_refuses_a_foreign_output_directory(tmp_path, capsys):
    out = tmp_path / "important"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = _run(["train-lm", "--out", str(out), "--corpus", str(_corpus(tmp_path)), "--size", "nano"], capsys)
    assert code == 2 and "is not a Celeris training run" in err and (out / "notes.txt").read_text() == "keep me"


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code, _, err = _run(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "model path does not exist" in err
    code, _, err = _run(["data", "stats", str(tmp_path / "nope"), "--tokenizer", "none"], capsys)
    assert code == 2 and "corpus not found" in err
    code, _, err = _run(["train-lm", "--out", str(tmp_path / "r"), "--size", "huge", "--corpus", str(_corpus(tmp_path))], capsys)
    assert code == 2 and "unknown model size 'huge'" in err
    code, _, err = _run(["generate", "--prompt", "hi", "--max-new-tokens", "0"], capsys)
    assert code == 2 and "max-new-tokens" in err


def test_device_and_dtype_errors_name_the_problem(capsys):
    code, _, err = _run(["bench", "speculative", "--device", "tpu"], capsys)
    assert code == 2 and "unknown device 'tpu'" in err and err.strip().count("\n") == 0
    code, _, err = _run(["bench", "speculative", "--dtype", "fp8"], capsys)
    assert code == 2 and "unknown dtype 'fp8'" in err
    if not torch.cuda.is_available():
        code, _, err = _run(["generate", "--prompt", "hi", "--device", "cuda"], capsys)
        assert code == 2 and "sees no CUDA GPU" in err
    else:
        code, _, err = _run(["generate", "--prompt", "hi", "--device", "cuda", "--memory", "h2o"], capsys)
        assert code == 2 and "CPU only" in err


def test_a_system_whose_optional_package_is_missing_says_what_to_install(capsys, monkeypatch):
    import celeris.cli as cli_mod

    cli_mod._register_system_commands()  # systems load on first use; loaded here so the test can remove one
    bench = cli_mod.cli.commands["bench"]
    monkeypatch.setattr(cli_mod.cli, "commands", {k: v for k, v in cli_mod.cli.commands.items() if k != "federate"})
    monkeypatch.setattr(bench, "commands", {k: v for k, v in bench.commands.items() if k != "federated"})
    cli_mod._register_unavailable("federated", "flwr")  # what a ModuleNotFoundError at registration does
    for args in (["federate", "simulate", "--clients", "3"], ["bench", "federated"]):
        code, _, err = _run(args, capsys)
        assert code == 2 and "needs the Python package 'flwr'" in err and "celeris[systems]" in err, args
        assert err.strip().count("\n") == 0
    cli_mod._register_unavailable("calm", "flwr")  # never shadows a working command
    assert cli_mod.cli.commands["calm"].help is None or "unavailable" not in cli_mod.cli.commands["calm"].help


def test_data_stats_counts_documents_and_characters(tmp_path, capsys):
    code, out, _ = _run(["data", "stats", str(_corpus(tmp_path)), "--tokenizer", "none", "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["documents"] == 60 and stats["characters"] > 3000


@pytest.mark.integration
def test_generate_json_on_the_default_model(capsys):
    code, out, _ = _run(["generate", "--prompt", "Say hello.", "--max-new-tokens", "8", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0 and set(obj) == {"text", "prompt_tokens", "new_tokens", "seconds", "tokens_per_second", "stats",
                                      "process_seconds"}
    assert 1 <= obj["new_tokens"] <= 8 and obj["prompt_tokens"] > 5
    assert obj["stats"]["engine"]["quantize"] == "int4-gguf" and obj["process_seconds"] > obj["seconds"] > 0


@pytest.mark.integration
def test_info_describes_the_default_model(capsys):
    code, out, _ = _run(["info", "--model", "default", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0 and obj["default_model"]["converted"] is True
    assert obj["model"]["layers"] == 30 and obj["model"]["kv_heads"] == 3 and obj["model"]["vocab_size"] == 49152
    assert obj["model"]["context_length"] == 8192


def test_train_lm_fine_tunes_a_loaded_model_with_its_own_tokenizer(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, eval_every=3, eval_batches=1, warmup_steps=1, progress=False)
    corpus = str(_corpus(tmp_path))
    train_lm(tmp_path / "base", corpus=corpus, size="nano", vocab_size=300, seq_len=32, config=cfg)
    res = train_lm(tmp_path / "tuned", corpus=corpus, model=str(tmp_path / "base"), seq_len=32, config=cfg)
    assert res.steps == 6 and res.best_val_loss is not None
    base, _ = load_model(str(tmp_path / "base"))
    tuned, tok = load_model(str(tmp_path / "tuned"))
    assert len(tok) == 300
    assert not torch.equal(base.model.norm.weight, tuned.model.norm.weight)  # it did train


@pytest.mark.parametrize(("flag", "value", "match"), [("--beam-width", "0", "beam width"), ("--beam-length", "0", "beam length"),
                                                      ("--beam-width", "65", "beam width")])
def test_generate_refuses_beam_settings_out_of_range_before_loading(capsys, flag, value, match):
    """An explicit 0 is an error, not "use the default" (the defaults are None, not falsy numbers)."""
    code, _, err = _run(["generate", "--prompt", "hi", "--drafter", "default", flag, value], capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_generate_does_not_import_the_systems():
    """`celeris generate` starts without Flower, kvpress or datasketch: systems load on first use."""
    import subprocess
    import sys

    code = ("import sys; from celeris.cli import cli; cli.get_command(None, 'generate'); "
            "print(sorted(m for m in ('flwr', 'kvpress', 'datasketch', 'celeris.federated') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
    code = "from celeris.cli import cli; print(cli.get_command(None, 'federate').name)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.strip() == "federate"
