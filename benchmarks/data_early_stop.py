"""Early stopping where it matters: a small curated corpus trained for several epochs.

Within `bench data`'s one-epoch budgets the validation loss is still falling when the budget ends,
so early stopping never fires there. Here the curated package-docs training split is cut to about
60k tokens and a nano model trains for `--steps` steps (many epochs) with the cosine schedule spanning
them; the `Trainer`'s early-stopping rule (patience in validation checks) is replayed on the full
curve (exact: batches and learning rates are a pure function of seed and step; the equivalence with
a real early-stopped `Trainer` run is pinned by `test_early_stopping_replay_matches_the_trainer`).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_early_stop.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
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


def main(out: str, steps: int = 400, train_chars: int = 250_000) -> None:
    torch.set_num_threads(1)
    cfg = DataBenchConfig(size="nano", budget_steps=steps, eval_every=20, eval_batches=4, progress=False)
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
    result = {"run": run, "train_documents": len(docs), "train_characters": chars, "budget_flops": budget}
    for patience in (1, 2, 3):
        rep = replay_early_stopping(run["history"], patience)
        rep["flops_saved_fraction"] = 1 - rep["stop_flops"] / run["flops"]
        rep["loss_given_up"] = rep["best_val_loss_at_stop"] - run["best_val_loss"]
        result[f"patience_{patience}"] = rep
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "early_stop.json")
