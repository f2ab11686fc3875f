"""Continue the CALM model of a `celeris bench calm` run on the same training blocks (diagnostic for the
energy head's slow start; the blocks repeat, so this is not a same-token comparison).

    python benchmarks/calm_continue.py --ae AE --run BENCH_OUT/calm --steps 500 --until 1000 1500

`--steps` must be the bench's --steps (it fixes the training blocks); the run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from celeris.calm.autoencoder import Autoencoder
from celeris.calm.bench import CALM_DEFAULT
from celeris.calm.model import CALM, CALMConfig, calm_loss
from celeris.calm.train import calm_training_flops_per_token, token_data
from celeris.corpora import load_corpus
from celeris.metrics import brier_lm
from celeris.trainer import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ae", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--until", type=int, nargs="+", default=[1000, 1500])
    a = p.parse_args()
    torch.set_num_threads(1)
    ae, tok = Autoencoder.load(a.ae), AutoTokenizer.from_pretrained(a.ae)
    data = load_corpus("python-stdlib")
    train, val = token_data(data, tok, 128, a.steps * a.batch_size * 128, max_val_tokens=8 * a.batch_size * 128)
    torch.manual_seed(0)
    cfg = CALMConfig(vocab_size=ae.config.vocab_size, patch_size=ae.config.patch_size, latent_size=ae.config.latent_size,
                     eos_token_id=tok.eos_token_id, **{**CALM_DEFAULT, "num_samples": a.samples})
    calm = CALM(cfg, ae)
    fpt = calm_training_flops_per_token(calm, 128 // cfg.patch_size)
    test = data.split("test").texts()
    for end in a.until:
        tc = TrainConfig(max_steps=end, eval_every=end, batch_size=a.batch_size, lr=2e-3, min_lr_ratio=1.0, warmup_steps=50,
                         eval_batches=8, seed=0, progress=False)
        res = Trainer(calm, train, val, a.run, tc, loss_fn=calm_loss, flops_per_token=fpt,
                      export_fn=lambda m, d: m.save(d), tokenizer=tok).train()
        b = brier_lm(calm, tok, test, block_size=128, max_tokens=8192)
        print(f"step {res.steps}: tokens {res.tokens:,}, train FLOPs {res.flops:.3g}, val energy loss {res.final_val_loss:.3f}, "
              f"BrierLM {b.brierlm:.2f} {[round(x, 4) for x in b.brier]}", flush=True)


if __name__ == "__main__":
    main()
