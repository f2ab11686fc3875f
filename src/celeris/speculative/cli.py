"""`celeris drafter train` and `celeris bench speculative` (registered by `celeris.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from celeris.validate import FiniteFloatRange


@click.group()
def drafter() -> None:
    """ReDrafter draft heads: train one for a model by local distillation."""


@drafter.command("train")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it holds a run); the drafter lands in OUT/drafter.")
@click.option("--model", "-m", default=None, help="Target model (default: SmolLM2-135M-Instruct).")
@click.option("--draft-vocab-size", default=4096, show_default=True, type=click.IntRange(16, 1_000_000),
              help="Reduced draft vocabulary: the most frequent target tokens of the distillation data.")
@click.option("--num-layers", default=1, show_default=True, type=click.IntRange(0, 16), help="Residual blocks.")
@click.option("--max-prompts", default=None, type=click.IntRange(8, 10**6), help="Use at most this many training prompts.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(8, 4096), help="Length of each distilled answer.")
@click.option("--gen-batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 100_000), help="Answers per training step.")
@click.option("--max-steps", default=400, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--max-minutes", default=None, type=FiniteFloatRange(min=0, min_open=True), help="Also stop after this much training time.")
@click.option("--lr", default=1e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--eval-every", default=25, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--patience", default=4, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--seed", default=0, show_default=True)
@click.option("--kd-weight", default=0.0, show_default=True, type=FiniteFloatRange(0.0, 1.0),
              help="Weight α of KL(target ‖ drafter) against CE on the greedy token, per draft position; the target's "
                   "distribution comes from its cached hidden states (no extra target forwards). 0 = ReDrafter's CE only.")
def drafter_train(out, model, draft_vocab_size, num_layers, max_prompts, max_new_tokens, gen_batch_size, batch_size,
                  max_steps, max_minutes, lr, eval_every, patience, seed, kd_weight) -> None:
    """Distil a model's own greedy answers into a RecurrentDrafter (target frozen, hidden states cached).

    Ctrl-C saves a checkpoint; the same command resumes (the distilled data is kept in OUT/data).
    """
    from celeris.io import check_output_path
    from celeris.speculative.train import train_drafter
    from celeris.trainer import TrainConfig

    check_output_path(out, "dir")
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, max_steps // 10), weight_decay=0.0,
                      eval_every=eval_every, eval_batches=4, patience=patience, seed=seed, desc="drafter",
                      max_seconds=max_minutes * 60 if max_minutes else None)
    s = train_drafter(out, model_name=model, draft_vocab_size=draft_vocab_size, num_layers=num_layers,
                      max_new_tokens=max_new_tokens, max_prompts=max_prompts, gen_batch_size=gen_batch_size,
                      config=cfg, seed=seed, kd_weight=kd_weight)
    acc = s["acceptance"]
    click.echo(f"stopped: {s['train']['stop_reason']} at step {s['train']['steps']}; "
               f"top-1 per position {[round(a, 3) for a in acc['top1_per_position']]}; "
               f"expected tokens/step at W=1: {acc['expected_tokens_per_step_w1']:.2f}")
    click.echo(f"drafter: {Path(out) / 'drafter'}")
    if s["train"]["stop_reason"] == "interrupted":
        sys.exit(130)


@drafter.command("train-assistant")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it holds a run); the model lands in OUT/model.")
@click.option("--distilled", default=None, type=click.Path(path_type=Path),
              help="Reuse the distillation data of this `celeris drafter train` run (its data/); default: OUT.")
@click.option("--model", "-m", default=None, help="Target model (default: SmolLM2-135M-Instruct).")
@click.option("--hidden-size", default=256, show_default=True, type=click.IntRange(16, 8192))
@click.option("--num-layers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--max-prompts", default=None, type=click.IntRange(8, 10**6), help="Use at most this many training prompts.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(8, 4096))
@click.option("--gen-batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--max-steps", default=1500, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--max-minutes", default=None, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--lr", default=3e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--eval-every", default=100, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--patience", default=4, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--seed", default=0, show_default=True)
def drafter_train_assistant(out, distilled, model, hidden_size, num_layers, max_prompts, max_new_tokens, gen_batch_size,
                            batch_size, max_steps, max_minutes, lr, eval_every, patience, seed) -> None:
    """Distil a small same-tokenizer LM for Hugging Face assisted generation (the `hf-assisted` peer).

    It learns the target's greedy answers from the same distillation data as the drafter; pass it to
    `celeris bench speculative --assistant OUT/model`.
    """
    from celeris.io import check_output_path
    from celeris.speculative.assistant import train_assistant
    from celeris.trainer import TrainConfig

    check_output_path(out, "dir")
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, max_steps // 15),
                      eval_every=eval_every, eval_batches=4, patience=patience, seed=seed, desc="assistant",
                      max_seconds=max_minutes * 60 if max_minutes else None)
    s = train_assistant(out, distilled, model_name=model, hidden_size=hidden_size, num_layers=num_layers,
                        max_new_tokens=max_new_tokens, max_prompts=max_prompts, gen_batch_size=gen_batch_size,
                        config=cfg, seed=seed)
    click.echo(f"stopped: {s['train']['stop_reason']} at step {s['train']['steps']}; {s['parameters']:,} parameters; "
               f"held-out top-1 agreement with the target {s['validation_top1_agreement']:.3f}")
    click.echo(f"assistant: {Path(out) / 'model'}")
    if s["train"]["stop_reason"] == "interrupted":
        sys.exit(130)


def register(cli: click.Group) -> None:
    cli.add_command(drafter)
    from celeris.speculative.bench import bench_speculative

    cli.commands["bench"].add_command(bench_speculative, "speculative")
