"""Early stopping where it matters: a small curated corpus trained for several epochs.

Within `bench data`'s one-epoch budgets the validation loss is still falling when the budget ends,
so early stopping never fires there. Here the curated package-docs training split is cut to about
60k tokens and a nano model trains for `--steps` steps (many epochs) with the cosine schedule spanning
them; the `Trainer`'s early-stopping rule (patience in validation checks) is replayed on the full
curve (exact: batches and learning rates are a pure function of seed and step; the equivalence with
a real early-stopped `Trainer` run is pinned by `test_early_stopping_replay_matches_the_trainer`).

    PYTHONPATH=src python benchmarks/data_early_stop.py [OUT.json] [--size tiny] [--steps 400]
        [--train-chars 250000] [--eval-every 20] [--threads 1]

The nano model (0.1M parameters) never overfits 81k tokens in 400 steps; a tiny model (3.1M) on a
smaller pool does, which is the case early stopping is for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from celeris.compute import training_flops_per_token
from celeris.curation.bench import (
    DataBenchConfig,
    _shuffled,
    _spread,
    _train_run,
    prepare_splits,
    replay_early_stopping,
)
from celeris.lm import token_blocks, train_tokenizer
from celeris.models import new_model


def main(out: str, steps: int = 400, train_chars: int = 250_000, size: str = "nano", eval_every: int = 20,
         threads: int = 1) -> None:
    torch.set_num_threads(threads)
    cfg = DataBenchConfig(size=size, budget_steps=steps, eval_every=eval_every, eval_batches=4, progress=False)
    train_raw, split = prepare_splits("package-docs", cfg)
    docs, chars = [], 0
    for d in _shuffled(split.train, cfg.seed):
        if chars >= train_chars:
            break
        docs.append(d)
        chars += len(d.text)
    tok = train_tokenizer([d.text for d in _shuffled(train_raw, cfg.seed)], cfg.vocab_size)
    n_val = cfg.eval_batches * cfg.batch_size
    val = _spread(token_blocks([d.text for d in _shuffled(split.val, cfg.seed)], tok, cfg.seq_len), n_val)
    raw_val = _spread(token_blocks([d.text for d in _shuffled(split.raw_val, cfg.seed)], tok, cfg.seq_len), n_val)
    probe = training_flops_per_token(new_model(cfg.size, vocab_size=len(tok), seed=cfg.seed), cfg.seq_len)
    budget = probe.total * steps * cfg.batch_size * cfg.seq_len
    run = _train_run("package-docs:small-curated", tok, docs, val, raw_val, cfg, budget, steps, Path(out).with_suffix(".run"))
    result = {"run": run, "train_documents": len(docs), "train_characters": chars, "budget_flops": budget,
              "size": size, "steps": steps, "eval_every": eval_every}
    for patience in (1, 2, 3):
        rep = replay_early_stopping(run["history"], patience)
        rep["flops_saved_fraction"] = 1 - rep["stop_flops"] / run["flops"]
        rep["loss_given_up"] = rep["best_val_loss_at_stop"] - run["best_val_loss"]
        best_step = min((h for h in run["history"] if h.get("step", 0) > 0), key=lambda h: h["val_loss"])["step"]
        rep["global_best_step"] = best_step  # checks_after_best counts from the best seen before the stop
        result[f"patience_{patience}"] = rep
        print(f"patience {patience}: stopped={rep['stopped']} at step {rep['stop_step']}, {rep['checks_after_best']} "
              f"checks after the best it had seen (the whole run's best: step {best_step}); FLOPs saved "
              f"{rep['flops_saved_fraction']:.1%}, loss given up {rep['loss_given_up']:.4f}")
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="early_stop.json")
    ap.add_argument("--size", default="nano")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-chars", type=int, default=250_000)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    main(a.out, a.steps, a.train_chars, a.size, a.eval_every, a.threads)
