"""CALM K ablation (issue 5): the same bench, the same tokens and budget, one autoencoder per K.

    python benchmarks/calm_k_ablation.py --ae 1=AE1 --ae 2=AE2 --ae 4=calm:ae --ae 8=AE8 \\
        --steps 2000 --out runs/kab --json benchmarks/calm_k_ablation.json

Each K runs `celeris bench calm` (Python: `celeris.calm.bench.bench_calm`) into OUT/kK with the same
corpus, tokenizer, steps, batch, sequence length, learning rate, N head samples and evaluation text,
so the Transformer baseline is retrained on the identical blocks in every run (its figures must agree
run to run: a check that the tokens are the same). Every autoencoder must use the same tokenizer
(`celeris calm train-ae --tokenizer src/celeris/artifacts/calm/default --vocab-size 260 --k K ...`).
A K whose OUT/kK/bench.json exists is not rerun, so an interrupted ablation resumes.
BrierLM for K < 4 uses the roll-out estimator (two roll-outs of ceil(4/K) chunks every 4 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from celeris.calm.artifacts import resolve
from celeris.calm.bench import bench_calm
from celeris.errors import CelerisError
from celeris.io import write_json


def parse_ae(items: list[str]) -> dict[int, str]:
    out = {}
    for item in items:
        k, sep, path = item.partition("=")
        if not sep or not k.isdigit() or int(k) < 1:
            raise CelerisError(f"--ae expects K=DIR with K a positive integer, got {item!r}")
        out[int(k)] = path
    return dict(sorted(out.items()))


def _median(fig) -> float:
    """A spread's median; a plain number from a bench.json written before speeds carried their spread."""
    return fig["median"] if isinstance(fig, dict) else fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ae", action="append", required=True, help="K=DIR, once per K")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--samples", type=int, default=6, help="CALM head samples N (the shipped bench: 6)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    try:
        aes = parse_ae(a.ae)
        rows = []
        for K, ae in aes.items():
            if a.seq_len % K:
                raise CelerisError(f"--seq-len {a.seq_len} is not a multiple of K = {K}")
            done = a.out / f"k{K}" / "bench.json"
            if done.is_file():
                r = json.loads(done.read_text())
                ran = (r["steps"], r["batch_size"], r["seq_len"], r["corpus"], r["eval_tokens"])
                if ran != (a.steps, a.batch_size, a.seq_len, a.corpus, a.eval_tokens):
                    raise CelerisError(f"{done} was run with other settings (steps, batch, seq_len, corpus, eval tokens "
                                       f"= {ran}); use another --out")
            else:
                print(f"== K = {K} ({ae})", flush=True)
                r = bench_calm(a.out / f"k{K}", resolve(ae), a.corpus, a.steps, a.stages, a.batch_size, a.seq_len, a.lr,
                               a.eval_tokens, calm_config={"num_samples": a.samples})
            if r["K"] != K:
                raise CelerisError(f"the autoencoder given for K = {K} has K = {r['K']}")
            b, c = r["baseline"], r["calm"]
            rows.append({"K": K, "calm_brierlm": c["brierlm"], "calm_brier": c["brier"], "calm_positions": c["positions"],
                         "baseline_brierlm": b["brierlm"], "brierlm_ratio": r["ratios"]["brierlm"],
                         "train_flops_ratio": r["ratios"]["train_flops"],
                         "inference_flops_ratio": r["ratios"]["inference_flops_per_token"],
                         "generation_steps": c["generation_steps"], "generation_new_tokens": r["generation_new_tokens"],
                         "generation_speedup": r["ratios"]["generation_speedup"], "train_tokens": r["train_tokens_each"],
                         "calm_params": c["params"], "calm_train_seconds": c["train_seconds"]})
    except CelerisError as exc:
        sys.exit(f"error: {exc}")
    print(f"{'K':>3}{'CALM BrierLM':>14}{'Brier-1..4':>30}{'baseline':>10}{'ratio':>7}{'train FLOPs':>13}"
          f"{'inf FLOPs':>11}{'steps/64':>10}{'gen speed':>10}")
    for r in rows:
        br = " ".join(f"{x:.3f}" for x in r["calm_brier"])
        print(f"{r['K']:>3}{r['calm_brierlm']:14.2f}{br:>30}{r['baseline_brierlm']:10.2f}{r['brierlm_ratio']:7.3f}"
              f"{r['train_flops_ratio']:13.3f}{r['inference_flops_ratio']:11.3f}{r['generation_steps']:10d}"
              f"{_median(r['generation_speedup']):9.2f}x")
    if a.json:
        write_json(a.json, {"settings": vars(a) | {"out": str(a.out), "json": str(a.json)}, "rows": rows})
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
