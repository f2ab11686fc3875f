"""Transformer vs CALM (K = 4) on the same tokens; the script behind the figures in docs/calm.md.

    python benchmarks/calm_bench.py --ae AE [--steps 500] [--repeats 5] [--out DIR] [--json OUT]

Same as `celeris bench calm`; fixed seed 0. Train the autoencoder first:
`celeris calm train-ae --out AE --vocab-size 260 --max-steps 1500`.
"""

from __future__ import annotations

import argparse

import torch

from celeris.calm.bench import bench_calm, print_table
from celeris.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ae", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--stages", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="Timed generation runs of each model after a warm-up.")
    p.add_argument("--out", default="celeris-bench-calm")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    r = bench_calm(a.out, a.ae, steps=a.steps, stages=a.stages, batch_size=a.batch_size, eval_tokens=a.eval_tokens,
                   calm_config={"num_samples": a.samples}, seed=0, repeats=a.repeats)
    print_table(r)
    if a.json:
        write_json(a.json, r)


if __name__ == "__main__":
    main()
