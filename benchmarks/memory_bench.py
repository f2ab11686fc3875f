"""Score vs. KV memory: every Celeris policy and kvpress press on the same synthetic long-context
samples, at the same budgets, in one run (fixed seeds). Prints the table and writes JSON; tokens/s is the median
(min-max) of --repeats timed runs of each sample after its scored run.

    PYTHONPATH=src python benchmarks/memory_bench.py --length 1024 --n 4 --budgets 0.25 \
        --kinds passkey,multi_needle,variable_tracking,kv_uuid --json memory_bench.json

(the same as `celeris tasks make --lengths 1024 --n 4 --seed 2` + `celeris bench memory`).
"""

from __future__ import annotations

import argparse

import torch

from celeris.io import write_json
from celeris.memory.evaluate import bench_memory, format_table
from celeris.memory.tasks import make_tasks
from celeris.models import load_model
from celeris.report import REPEATS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=768)
    ap.add_argument("--n", type=int, default=1, help="samples per task kind")
    ap.add_argument("--seed", type=int, default=2, help="task seed (evolution used seed 1)")
    ap.add_argument("--budgets", default="0.25")
    ap.add_argument("--policies", default="streaming_llm,l2,h2o,random,namm")
    ap.add_argument("--kinds", default="passkey,multi_needle,variable_tracking,kv_uuid")
    ap.add_argument("--protocols", default="press,chunked")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=REPEATS, help="Timed runs of each sample after its scored run.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(attn_implementation="eager")
    samples = make_tasks(args.kinds.split(","), [args.length], args.n, args.seed)
    res = bench_memory(model, tok, samples, [float(b) for b in args.budgets.split(",")], args.policies.split(","),
                       None, max_new_tokens=args.max_new_tokens, protocols=args.protocols.split(","), repeats=args.repeats)
    res["tasks_made_with"] = f"make_tasks({args.kinds.split(',')}, [{args.length}], {args.n}, seed={args.seed})"
    print(format_table(res["results"]))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
