"""Every Celeris policy and kvpress press on two independently written task families, side by side.

NAMM was evolved and selected on the synthetic family (`celeris tasks make`, the default); the prose family
(`celeris tasks make --family prose`) was written apart from it and is never used for evolution or selection.
Each task file runs through `bench_memory` with the same settings (what `celeris bench memory` runs, scored runs
only: no timed reruns, so no speed figures come from this), plus a negative control per file: the full cache
with the context removed, which says how much of a family can be answered without reading it.

    celeris tasks make --family prose --out benchmarks/memory_families_prose1600.jsonl --lengths 1600 --n 8 --seed 31
    celeris tasks make --out benchmarks/memory_families_synthetic1600.jsonl \\
        --kinds passkey,multi_needle,variable_tracking --lengths 1600 --n 8 --seed 31
    PYTHONPATH=src python benchmarks/memory_families.py benchmarks/memory_families_prose1600.jsonl \\
        benchmarks/memory_families_synthetic1600.jsonl --json benchmarks/memory_families_1600.json
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from celeris.io import write_json
from celeris.memory.evaluate import bench_memory, evaluate_policy, format_table
from celeris.memory.tasks import FAMILIES, load_tasks
from celeris.models import load_model


def family_of(samples: list[dict]) -> str:
    names = {f for s in samples for f, (kinds, _, _) in FAMILIES.items() if s["task"] in kinds}
    return "+".join(sorted(names)) or "other"


def first_per_kind(samples: list[dict], limit: int | None) -> list[dict]:
    seen: Counter = Counter()
    out = []
    for s in samples:
        seen[s["task"]] += 1
        if limit is None or seen[s["task"]] <= limit:
            out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="+", help="task files, one per family")
    ap.add_argument("--budgets", default="0.25")
    ap.add_argument("--policies", default="streaming_llm,l2,h2o,random,namm")
    ap.add_argument("--presses", default=None, help="default: all six kvpress presses")
    ap.add_argument("--protocols", default="press")
    ap.add_argument("--limit", type=int, default=None, help="at most this many samples per kind")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(attn_implementation="eager")
    out = {"families": {}, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    for path in args.tasks:
        samples = first_per_kind(load_tasks(path), args.limit)
        res = bench_memory(model, tok, samples, [float(b) for b in args.budgets.split(",")], args.policies.split(","),
                           args.presses.split(",") if args.presses else None, max_new_tokens=args.max_new_tokens,
                           protocols=args.protocols.split(","), repeats=None, artifacts={"tasks": path})
        blind = evaluate_policy(model, tok, [{**s, "context": ""} for s in samples], "full", None,
                                max_new_tokens=args.max_new_tokens, name="full, no context", protocol="press")
        blind["budget"] = "1"
        name = family_of(samples)
        out["families"][name] = {"file": path, "bench": res, "no_context": blind}
        print(f"\n{name} family ({path}, {len(samples)} samples)")
        print(format_table(res["results"] + [blind]))
        if args.json:  # after each family, so a late failure keeps the first
            write_json(args.json, out)


if __name__ == "__main__":
    main()
