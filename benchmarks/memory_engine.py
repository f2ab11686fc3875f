"""Memory policies on the engine, with and without ReDrafter, against today's HF runner, on the same samples.

    python benchmarks/memory_engine.py --json benchmarks/memory_engine_cpu.json [--n 2] [--lengths 1024]

Samples: `celeris tasks make --lengths 1024 --n 2 --seed 2` (5 kinds x 2, ~1k-token prompts; not used by the
shipped NAMM's evolution, which `check_held_out` verifies). Chunked protocol (eviction every n_up = 128
tokens through prompt and answer), budget 0.25, greedy, each sample's own answer length. Rows:
- hf-fp32-namm: today's path (`celeris memory eval`): the fp32 HF model, eager attention, NAMM;
- engine-namm: the default int4 engine, NAMM, the cache compacted in place (eager steps);
- engine-namm-redrafter: the same with the shipped drafter (one beam, adaptive length up to 4);
- engine-full-redrafter: drafting alone (keep-everything policy);
- engine-full: plain decoding on the engine, keep-everything.
Per row: mean score over kinds (the task file's metric), answer tokens/s (new tokens over each sample's whole
run, prefill included, summed), peak KV bytes allocated and (engine rows) held. Each drafted row's tokens are
checked against the plain row with the same policy on the engine (identity as tests/test_compose.py defines it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from celeris.compose import redrafter_with_memory
    from celeris.engine import load_engine
    from celeris.engine.bench import environment
    from celeris.generation import eos_token_ids
    from celeris.io import save_results
    from celeris.memory import make_policy, parse_budget, run_with_memory
    from celeris.memory.evaluate import check_held_out
    from celeris.memory.tasks import build_prompt, make_tasks, score_answer
    from celeris.models import load_model
    from celeris.speculative.bench import default_drafter_dir
    from celeris.speculative.decoding import SpeculativeStats
    from celeris.speculative.engine_decoding import load_drafter_for_engine

    engine = load_engine(compile=False)
    tok = engine.tokenizer
    hf, _ = load_model(None, attn_implementation="eager")
    drafter = load_drafter_for_engine(default_drafter_dir(), engine)
    samples = make_tasks(lengths=[int(x) for x in args.lengths.split(",")], n=args.n, seed=2)
    check_held_out(make_policy("namm"), samples)
    budget = parse_budget(args.budget)
    eos = eos_token_ids(engine.model, tok)

    def run(name, sample, ids, n_new):
        if name == "hf-fp32-namm":
            return run_with_memory(hf, ids, make_policy("namm"), budget, max_new_tokens=n_new, eos_ids=eos)
        if name == "engine-namm":
            return run_with_memory(engine, ids, make_policy("namm"), budget, max_new_tokens=n_new, eos_ids=eos)
        if name == "engine-full":
            return run_with_memory(engine, ids, make_policy("full"), None, max_new_tokens=n_new, eos_ids=eos)
        pol, b = (make_policy("namm"), budget) if name == "engine-namm-redrafter" else (make_policy("full"), None)
        st = SpeculativeStats()
        res = redrafter_with_memory(engine, drafter, ids, pol, b, n_new, eos_ids=eos, stats=st)
        return res

    names = ["hf-fp32-namm", "engine-namm", "engine-namm-redrafter", "engine-full-redrafter", "engine-full"]
    rows: dict[str, list[dict]] = defaultdict(list)
    for i, s in enumerate(samples):
        ids, _ = build_prompt(s, tok)
        n_new = int(s.get("max_new_tokens", 24))
        print(f"sample {i + 1}/{len(samples)} ({s['task']}, {ids.shape[1]} tokens)", file=sys.stderr, flush=True)
        for name in names:
            t0 = time.perf_counter()
            res = run(name, s, ids, n_new)
            secs = time.perf_counter() - t0
            pred = tok.decode(res.new_ids, skip_special_tokens=True)
            rows[name].append({"id": s["id"], "task": s["task"], "score": score_answer(pred, s["answers"], s["metric"]),
                               "new_ids": res.new_ids, "new_tokens": len(res.new_ids), "seconds": secs,
                               "peak_kv_bytes": res.peak_kv_bytes, "full_peak_kv_bytes": res.full_peak_kv_bytes,
                               "peak_held_kv_bytes": res.extra.get("peak_held_kv_bytes"),
                               "tokens_per_step": res.extra.get("speculative", {}).get("tokens_per_step")})
    full_ids = [r["new_ids"] for r in rows["engine-full"]]
    rows_out = []
    for name in names:
        rs = rows[name]
        per_task = defaultdict(list)
        for r in rs:
            per_task[r["task"]].append(r["score"])
        identical = None
        if name == "engine-namm-redrafter":
            identical = sum(r["new_ids"] == p["new_ids"] for r, p in zip(rs, rows["engine-namm"], strict=True))
        elif name == "engine-full-redrafter":
            identical = sum(r["new_ids"] == f for r, f in zip(rs, full_ids, strict=True))
        steps = [r["tokens_per_step"] for r in rs if r["tokens_per_step"]]
        rows_out.append({"name": name, "mean_score": statistics.fmean(statistics.fmean(v) for v in per_task.values()),
                         "per_task": {k: statistics.fmean(v) for k, v in sorted(per_task.items())},
                         "answer_tokens_per_second": sum(r["new_tokens"] for r in rs) / sum(r["seconds"] for r in rs),
                         "seconds": sum(r["seconds"] for r in rs),
                         "peak_kv_bytes": max(r["peak_kv_bytes"] for r in rs),
                         "peak_held_kv_bytes": max((r["peak_held_kv_bytes"] or 0) for r in rs) or None,
                         "kv_bytes_ratio": statistics.fmean(r["peak_kv_bytes"] / r["full_peak_kv_bytes"] for r in rs),
                         "tokens_per_step": statistics.fmean(steps) if steps else None,
                         "identical": None if identical is None else f"{identical}/{len(rs)}", "samples": rs})
    print(f"{'row':<24}{'score':>7}{'answer tok/s':>14}{'seconds':>9}{'peak KV MB':>12}{'held MB':>9}{'tok/step':>10}{'identical':>11}")
    for r in rows_out:
        held = f"{r['peak_held_kv_bytes'] / 1e6:.1f}" if r["peak_held_kv_bytes"] else "-"
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        print(f"{r['name']:<24}{r['mean_score']:>7.3f}{r['answer_tokens_per_second']:>14.1f}{r['seconds']:>9.1f}"
              f"{r['peak_kv_bytes'] / 1e6:>12.1f}{held:>9}{tps:>10}{r['identical'] or '-':>11}")
    res = {"environment": environment(), "engine": engine.info.to_dict(), "rows": rows_out,
           "settings": {"tasks": f"make_tasks(lengths={args.lengths}, n={args.n}, seed=2)", "budget": args.budget,
                        "protocol": "chunked", "n_up": 128, "greedy": True, "drafter": "shipped, one beam, adaptive <= 4"}}
    if args.json:
        save_results(args.json, res)
    bad = [r["name"] for r in rows_out if r["identical"] is not None and not r["identical"].startswith(f"{len(samples)}/")]
    if bad:
        print(f"error: drafted output differs from its plain reference: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
