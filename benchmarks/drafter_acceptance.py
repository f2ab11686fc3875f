"""Held-out acceptance of one or more drafters, by prompt group, teacher-forced (no timing).

    python benchmarks/drafter_acceptance.py RUN_DIR DRAFTER_DIR [DRAFTER_DIR ...] [--json OUT]

RUN_DIR is a `celeris drafter train --out` directory made with the current prompt lists: its
validation shards are read, not regenerated. Groups: the hand-written validation prompts, the
everyday validation prompts (subjects no training prompt mentions), the docstring validation prompts,
all of them, and the benchmark prompts (`EVAL_PROMPTS`; their greedy answers are distilled here, for
this table only). Per group: top-1 at draft positions 1..5 and the expected tokens per target step at
W = 1 for L = 4 and L = 5 (1 + sum of P(positions 1..i all right)). Decoding reaches these figures:
the loop commits exactly the teacher-forced agreement run, plus the bonus token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from celeris.io import load_tensors, write_json
from celeris.models import load_model
from celeris.speculative import prompts as P
from celeris.speculative.drafter import load_drafter
from celeris.speculative.train import _digest, acceptance_metrics, distill_data


def validation_groups(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    vp = P.evaluation_prompts()
    shards = []
    for b0 in range(0, len(vp), 64):
        path = run_dir / "data" / f"validation-{_digest(vp[b0 : b0 + 64])}.safetensors"
        shards.append(load_tensors(path, "validation shard (made with other prompts? rerun `celeris drafter train`)"))
    val = {k: torch.cat([s[k] for s in shards]) for k in ("h", "y")}
    n1 = len(P.VALIDATION_PROMPTS)
    n2 = len(vp) - len(P.docstring_prompts("test"))
    return val, {"hand-written": (0, n1), "everyday (unseen subjects)": (n1, n2), "docstring": (n2, len(vp)),
                 "all validation": (0, len(vp))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("drafters", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model()
    val, groups = validation_groups(args.run_dir)
    data = {g: {"h": val["h"][a:b], "y": val["y"][a:b]} for g, (a, b) in groups.items()}
    bench = distill_data(model, tok, list(P.EVAL_PROMPTS), 128, 12, progress=False)
    data[f"benchmark prompts ({len(P.EVAL_PROMPTS)})"] = bench
    data["benchmark prompts (first 8)"] = {k: v[:8] for k, v in bench.items()}
    out = {}
    for d in args.drafters:
        drafter = load_drafter(d, model)
        out[d] = {}
        for g, batch in data.items():
            m = acceptance_metrics(drafter, batch)
            acc = m["acceptance_w1"]
            out[d][g] = {"top1": [round(x, 3) for x in m["top1_per_position"]],
                         "tokens_per_step_L4": round(1 + sum(acc[:3]), 3), "tokens_per_step_L5": round(1 + sum(acc[:4]), 3)}
    print(f"{'drafter':<40} {'group':<30} {'top-1 at positions 1..5':<36} {'L=4':>5} {'L=5':>5}")
    for d, rows in out.items():
        for g, r in rows.items():
            print(f"{d[-40:]:<40} {g:<30} {', '.join(f'{x:.2f}' for x in r['top1']):<36} "
                  f"{r['tokens_per_step_L4']:>5.2f} {r['tokens_per_step_L5']:>5.2f}")
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    else:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
