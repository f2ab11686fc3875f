"""Ablation for `bench data` on python-stdlib: the curated run *without* decontamination.

Same tokenizer, validation blocks, model size, seed and FLOPs budget as
`celeris bench data --corpus python-stdlib --size nano --budget-steps 150 --eval-every 10 --eval-batches 4`,
so its curve can be set beside that run's.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_ablation_decontam.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from celeris.compute import training_flops_per_token
from celeris.curation.bench import DataBenchConfig, _shuffled, _spread, _train_run, prepare_splits
from celeris.curation.pipeline import CurationConfig, curate_documents
from celeris.lm import token_blocks, train_tokenizer
from celeris.models import new_model


def main(out: str) -> None:
    torch.set_num_threads(1)
    cfg = DataBenchConfig(size="nano", budget_steps=150, eval_every=10, eval_batches=4, progress=False)
    train_raw, split = prepare_splits("python-stdlib", cfg)
    rules = tuple(r for r in CurationConfig().enabled() if r != "decontamination")
    res = curate_documents(train_raw, CurationConfig(rules=rules))
    tok = train_tokenizer([d.text for d in _shuffled(train_raw, cfg.seed)], cfg.vocab_size)
    n_val = cfg.eval_batches * cfg.batch_size
    val = _spread(token_blocks([d.text for d in _shuffled(split.val, cfg.seed)], tok, cfg.seq_len), n_val)
    raw_val = _spread(token_blocks([d.text for d in _shuffled(split.raw_val, cfg.seed)], tok, cfg.seq_len), n_val)
    probe = training_flops_per_token(new_model(cfg.size, vocab_size=len(tok), seed=cfg.seed), cfg.seq_len)
    budget = probe.total * cfg.budget_steps * cfg.batch_size * cfg.seq_len
    r = _train_run("stdlib:curated-no-decontam", tok, res.kept, val, raw_val, cfg, budget, cfg.budget_steps,
                   Path(out).with_suffix(".run"))
    r["train_documents"] = len(res.kept)
    r["train_characters"] = sum(len(d.text) for d in res.kept)
    Path(out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nodecon.json")
