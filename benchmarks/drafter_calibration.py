"""Is the drafter's confidence a usable estimate of acceptance? Teacher-forced, on the held-out validation prompts.

    python benchmarks/drafter_calibration.py RUN_DIR [DRAFTER_DIR] [--json OUT]

RUN_DIR is a `celeris drafter train --out` directory made with the current prompt lists (its validation
shards are read; see `benchmarks/drafter_acceptance.py`). DRAFTER_DIR defaults to the shipped drafter.
For every answer position with five drafted positions after it: the drafter's probability of its own
top-1 token at draft position 1, binned, against how often that token is the target's greedy token.
The adaptive draft length (`celeris.speculative.decoding.choose_length`) takes the drafter's cumulative
probability as P(accepted); this table is the evidence that it may.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from celeris.io import write_json
from celeris.models import load_model
from celeris.speculative.bench import default_drafter_dir
from celeris.speculative.drafter import load_drafter
from celeris.speculative.train import DRAFT_STEPS, _teacher_forced_logits

BINS = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 0.9), (0.9, 1.0001)]


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from drafter_acceptance import validation_groups

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("drafter", nargs="?", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, _ = load_model()
    drafter = load_drafter(args.drafter or default_drafter_dir(), model).eval()
    val, _ = validation_groups(args.run_dir)
    probs, hits = [], []
    with torch.inference_mode():
        for b0 in range(0, len(val["y"]), 16):
            h, y = val["h"][b0 : b0 + 16], val["y"][b0 : b0 + 16]
            logits, _ = _teacher_forced_logits(drafter, h, y, DRAFT_STEPS)
            B, T = y.shape
            yy = torch.cat([y, torch.full((B, DRAFT_STEPS), -100, dtype=y.dtype)], dim=1)
            p, arg = torch.softmax(logits.float(), -1).max(-1)  # [steps, B, T]
            tgt = torch.stack([yy[:, i + 1 : i + 1 + T] for i in range(DRAFT_STEPS)])
            keep = (y >= 0) & (tgt >= 0).all(0)
            probs.append(p[0][keep])
            hits.append((drafter.draft_to_target[arg[0]] == tgt[0])[keep])
    p, hit = torch.cat(probs), torch.cat(hits).float()
    rows = []
    print(f"{'drafter p(top-1)':<18}{'share':>8}{'accuracy':>10}{'mean p':>8}")
    for lo, hi in BINS:
        m = (p >= lo) & (p < hi)
        row = {"bin": [lo, min(hi, 1.0)], "positions": int(m.sum()), "share": float(m.float().mean()),
               "accuracy": float(hit[m].mean()) if m.any() else None, "mean_p": float(p[m].mean()) if m.any() else None}
        rows.append(row)
        print(f"[{lo:.1f}, {min(hi, 1.0):.1f}){'':<8}{row['share']:>8.2f}{row['accuracy'] or 0:>10.2f}{row['mean_p'] or 0:>8.2f}")
    print(f"all positions: {len(p)}, accuracy {float(hit.mean()):.3f}, mean p {float(p.mean()):.3f}")
    if args.json:
        write_json(args.json, {"positions": len(p), "accuracy": float(hit.mean()), "mean_p": float(p.mean()), "bins": rows})


if __name__ == "__main__":
    main()
