"""`celeris brierlm`, `celeris calm train-ae | eval-ae | train | generate`, and `celeris bench calm`:
thin recipes over `celeris.metrics.brier_lm`, `celeris.calm.train`, `celeris.calm.sampling` and
`celeris.calm.bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from celeris.errors import CelerisError
from celeris.validate import FiniteFloatRange


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CelerisError(f"cannot read text file {path}: {exc}") from None
    if not text.strip():
        raise CelerisError(f"text file {path} is empty")
    return text


def _train_config(steps, batch_size, lr, warmup, eval_every, minutes, seed, desc):
    from celeris.trainer import TrainConfig

    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, eval_every=eval_every,
                       max_seconds=minutes * 60 if minutes else None, seed=seed, desc=desc)


def _finish_training(res, out, as_json) -> None:
    from celeris.validate import emit_json

    if as_json:
        emit_json(res.to_dict())
    else:
        click.echo(f"stopped: {res.stop_reason} at step {res.steps}; best validation loss {res.best_val_loss:.4f}; "
                   f"{res.tokens:,} tokens, {res.flops:.3g} FLOPs, {res.seconds:.0f} s; saved to {out}")
    if res.stop_reason == "interrupted":
        sys.exit(130)


@click.command("brierlm")
@click.option("--model", "-m", default=None, help="Any causal LM (dir, .gguf, hub id, default model) or a CALM dir / calm:default.")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="A UTF-8 text file to score.")
@click.option("--block-size", default=128, show_default=True, type=click.IntRange(8, 8192), help="Tokens per scored block.")
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(8), help="Score at most this many tokens.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help='Print {"brierlm", "brier": [b1..b4], "brier_stderr", "positions", "estimator", "zero_reason"}.')
def brierlm_cmd(model, text_file, block_size, max_tokens, seed, as_json) -> None:
    """BrierLM (×100) with Brier-1..4 of any LM on a text file (likelihood-free for CALM models)."""
    from celeris.calm.artifacts import load_any
    from celeris.metrics import brier_lm
    from celeris.validate import emit_json

    text = _read_text(text_file)
    net, tok = load_any(model)
    res = brier_lm(net, tok, text, block_size=block_size, max_tokens=max_tokens, seed=seed)
    if as_json:
        emit_json(res.to_dict())
    else:
        briers = ", ".join(f"{b:.4f} ± {se:.4f}" for b, se in zip(res.brier, res.brier_stderr, strict=True))
        click.echo(f"BrierLM {res.brierlm:.2f}  (Brier-1..4: {briers}; {res.positions:,} positions; {res.estimator})")
    if res.zero_reason:
        click.echo(res.zero_reason, err=True)


@click.group("calm")
def calm_group() -> None:
    """Continuous autoregressive LMs: autoencoder, energy-head LM, likelihood-free sampling."""


@calm_group.command("train-ae")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--corpus", "-c", default="python-stdlib", show_default=True)
@click.option("--tokenizer", default=None, help="Reuse this model's tokenizer (default: train a BPE on the corpus).")
@click.option("--vocab-size", default=512, show_default=True, type=click.IntRange(257, 1_000_000))
@click.option("--k", "patch_size", default=4, show_default=True, type=click.IntRange(1, 64), help="Tokens per latent.")
@click.option("--hidden", default=128, show_default=True, type=click.IntRange(8))
@click.option("--latent", default=32, show_default=True, type=click.IntRange(2))
@click.option("--max-steps", default=4000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Chunks per step.")
@click.option("--lr", default=3e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--warmup-steps", default=100, show_default=True, type=click.IntRange(0))
@click.option("--eval-every", default=500, show_default=True, type=click.IntRange(1))
@click.option("--max-train-tokens", default=2_000_000, show_default=True, type=click.IntRange(1000))
@click.option("--max-minutes", default=None, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def train_ae_cmd(out, corpus, tokenizer, vocab_size, patch_size, hidden, latent, max_steps, batch_size, lr, warmup_steps,
                 eval_every, max_train_tokens, max_minutes, seed, overwrite, as_json) -> None:
    """Train the K-token autoencoder (token dropout, latent dropout, clipped KL) on a corpus."""
    from celeris.calm.train import train_ae
    from celeris.io import check_output_path

    check_output_path(out, "dir")
    cfg = _train_config(max_steps, batch_size, lr, warmup_steps, eval_every, max_minutes, seed, "train AE")
    res = train_ae(out, corpus, tokenizer, vocab_size,
                   {"patch_size": patch_size, "hidden_size": hidden, "intermediate_size": int(2.5 * hidden), "latent_size": latent},
                   cfg, max_train_tokens, overwrite)
    _finish_training(res, out, as_json)


@calm_group.command("eval-ae")
@click.option("--ae", "ae_dir", default=None, help="Autoencoder directory (default: the one of calm:default).")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path))
@click.option("--noise", default=0.0, show_default=True, type=FiniteFloatRange(min=0.0), help="σ of Gaussian noise added to μ.")
@click.option("--max-tokens", default=200_000, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help='Print {"token_accuracy", "noise"}.')
def eval_ae_cmd(ae_dir, text_file, noise, max_tokens, as_json) -> None:
    """Token reconstruction accuracy of an autoencoder, clean or with noise on the latent mean."""
    from transformers import AutoTokenizer

    from celeris.calm.artifacts import resolve, tokenizer_dir
    from celeris.calm.autoencoder import Autoencoder
    from celeris.calm.train import eval_ae
    from celeris.validate import emit_json

    path = resolve(ae_dir, default="calm:ae")
    ae = Autoencoder.load(path)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(path))
    except Exception:
        raise CelerisError(f"no tokenizer found in {path} or its parent") from None
    res = eval_ae(ae, tok, [_read_text(text_file)], noise, max_tokens)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"token accuracy {100 * res['token_accuracy']:.3f}% over {res['tokens']:,} tokens (noise σ = {noise})")


@calm_group.command("train")
@click.option("--ae", "ae_dir", required=True, help="The frozen autoencoder (and its tokenizer).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--corpus", "-c", default="python-stdlib", show_default=True)
@click.option("--hidden", default=128, show_default=True, type=click.IntRange(8))
@click.option("--layers", default=4, show_default=True, type=click.IntRange(1))
@click.option("--heads", default=4, show_default=True, type=click.IntRange(1))
@click.option("--head-blocks", default=1, show_default=True, type=click.IntRange(1), help="Energy-head blocks (layers/4).")
@click.option("--samples", "num_samples", default=8, show_default=True, type=click.IntRange(2), help="N head samples.")
@click.option("--target-samples", default=100, show_default=True, type=click.IntRange(1), help="M posterior samples.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8))
@click.option("--max-steps", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=2e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--warmup-steps", default=50, show_default=True, type=click.IntRange(0))
@click.option("--eval-every", default=200, show_default=True, type=click.IntRange(1))
@click.option("--max-train-tokens", default=2_000_000, show_default=True, type=click.IntRange(1000))
@click.option("--max-minutes", default=None, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def train_cmd(ae_dir, out, corpus, hidden, layers, heads, head_blocks, num_samples, target_samples, seq_len, max_steps,
              batch_size, lr, warmup_steps, eval_every, max_train_tokens, max_minutes, seed, overwrite, as_json) -> None:
    """Train a CALM model (Llama backbone + energy head) on a frozen autoencoder's latents."""
    from celeris.calm.artifacts import resolve
    from celeris.calm.train import train_calm
    from celeris.io import check_output_path

    check_output_path(out, "dir")
    cfg = _train_config(max_steps, batch_size, lr, warmup_steps, eval_every, max_minutes, seed, "train CALM")
    calm_cfg = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                "intermediate_size": 3 * hidden, "num_mlp_layers": head_blocks, "num_samples": num_samples,
                "num_target_samples": target_samples}
    res, _ = train_calm(out, resolve(ae_dir), corpus, calm_cfg, cfg, seq_len, max_train_tokens, overwrite)
    _finish_training(res, out, as_json)


@calm_group.command("generate")
@click.option("--model", "-m", default=None, help="CALM directory (default: calm:default).")
@click.option("--ae", "ae_dir", default=None, help="Use this autoencoder instead of the model's own.")
@click.option("--prompt", "-p", required=True)
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--temperature", "-t", default=0.5, show_default=True, type=FiniteFloatRange(), help="In (0, 1]; batch sampler: 1/T an integer.")
@click.option("--sampler", type=click.Choice(["batch", "exact"]), default="batch", show_default=True)
@click.option("--samples", "num_samples", default=200, show_default=True, type=click.IntRange(1), help="Batch sampler's N.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"text", "new_tokens", "steps", "tokens_per_second"}.')
def generate_cmd(model, ae_dir, prompt, max_new_tokens, temperature, sampler, num_samples, seed, as_json) -> None:
    """Generate with a CALM model: one backbone step per K tokens, likelihood-free temperature."""
    from celeris.calm.artifacts import load_calm
    from celeris.calm.sampling import calm_generate, check_temperature
    from celeris.validate import emit_json

    check_temperature(temperature, sampler)
    net, tok = load_calm(model, ae_dir)
    r = calm_generate(net, tok, prompt, max_new_tokens, temperature, sampler, num_samples, seed)
    if as_json:
        emit_json(r.to_dict())
    else:
        click.echo(prompt + r.text)
        click.echo(f"[{r.new_tokens} tokens in {r.steps} steps, {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s, "
                   f"{r.draws} head samples]", err=True)


@click.command("calm")
@click.option("--ae", "ae_dir", default="calm:ae", show_default=True, help="Frozen autoencoder (its tokenizer is used by both models).")
@click.option("--corpus", "-c", default="python-stdlib", show_default=True)
@click.option("--steps", default=500, show_default=True, type=click.IntRange(2), help="Training steps for each model.")
@click.option("--samples", "num_samples", default=6, show_default=True, type=click.IntRange(2), help="CALM head samples N.")
@click.option("--stages", default=5, show_default=True, type=click.IntRange(1), help="Checkpoints scored along the run.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8))
@click.option("--lr", default=2e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--eval-tokens", default=8192, show_default=True, type=click.IntRange(256))
@click.option("--out", "-o", default="celeris-bench-calm", show_default=True, type=click.Path(path_type=Path))
@click.option("--ship", default=None, type=click.Path(path_type=Path), help="Also copy both models here (artifact folder).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Timed generation runs of each model after a warm-up; tokens/s is their median with min-max.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the result JSON here.")
def bench_cmd(ae_dir, corpus, steps, num_samples, stages, batch_size, seq_len, lr, eval_tokens, out, ship, repeats,
              json_out) -> None:
    """Transformer vs CALM (K=4) on the same tokens: BrierLM, FLOPs, generation steps and speed."""
    from celeris.calm.artifacts import resolve
    from celeris.calm.bench import bench_calm, print_table
    from celeris.io import check_output_path, save_results

    check_output_path(out, "dir")
    if ship is not None:
        check_output_path(ship, "dir", "--ship")
    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    r = bench_calm(out, resolve(ae_dir), corpus, steps, stages, batch_size, seq_len, lr, eval_tokens,
                   calm_config={"num_samples": num_samples}, ship=ship, repeats=repeats)
    print_table(r)
    if json_out:
        save_results(json_out, r)


def register(cli: click.Group) -> None:
    import celeris.calm  # noqa: F401  (registers calm:default / calm:baseline)

    cli.add_command(brierlm_cmd, "brierlm")
    cli.add_command(calm_group, "calm")
    cli.commands["bench"].add_command(bench_cmd, "calm")
