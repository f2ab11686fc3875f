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
    ap.add_argument("--repeats", type=int, default=5, help="Timed runs of each row per sample after its scored run.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from celeris.compose import redrafter_with_memory
    from celeris.engine import load_engine
    from celeris.errors import CelerisError
    from celeris.generation import eos_token_ids
    from celeris.io import save_results
    from celeris.memory import make_policy, parse_budget, run_with_memory
    from celeris.memory.evaluate import check_held_out
    from celeris.memory.policies import DEFAULT_NAMM
    from celeris.memory.tasks import build_prompt, make_tasks, score_answer
    from celeris.models import default_gguf_path, load_model
    from celeris.report import check_repeats, environment, format_spread, spread
    from celeris.speculative.bench import default_drafter_dir
    from celeris.speculative.decoding import SpeculativeStats
    from celeris.speculative.engine_decoding import load_drafter_for_engine

    try:
        check_repeats(args.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
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
        for name in names:  # the scored run, also each row's warm-up for the timed runs
            res = run(name, s, ids, n_new)
            pred = tok.decode(res.new_ids, skip_special_tokens=True)
            rows[name].append({"id": s["id"], "task": s["task"], "score": score_answer(pred, s["answers"], s["metric"]),
                               "new_ids": res.new_ids, "new_tokens": len(res.new_ids), "seconds": [],
                               "peak_kv_bytes": res.peak_kv_bytes, "full_peak_kv_bytes": res.full_peak_kv_bytes,
                               "peak_held_kv_bytes": res.extra.get("peak_held_kv_bytes"),
                               "tokens_per_step": res.extra.get("speculative", {}).get("tokens_per_step")})
        for r in range(args.repeats):  # timed runs: every row in turn, the order rotated (greedy: the same tokens)
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                run(name, s, ids, n_new)
                rows[name][-1]["seconds"].append(time.perf_counter() - t0)
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
                         # per repeat: all samples' new tokens over all samples' seconds in that repeat
                         "answer_tokens_per_second": spread([sum(r["new_tokens"] for r in rs) / sum(r["seconds"][k] for r in rs)
                                                             for k in range(args.repeats)]),
                         "seconds": spread([sum(r["seconds"][k] for r in rs) for k in range(args.repeats)]),
                         "peak_kv_bytes": max(r["peak_kv_bytes"] for r in rs),
                         "peak_held_kv_bytes": max((r["peak_held_kv_bytes"] or 0) for r in rs) or None,
                         "kv_bytes_ratio": statistics.fmean(r["peak_kv_bytes"] / r["full_peak_kv_bytes"] for r in rs),
                         "tokens_per_step": statistics.fmean(steps) if steps else None,
                         "identical": None if identical is None else f"{identical}/{len(rs)}", "samples": rs})
    print(f"answer tokens/s and seconds: median (min-max) of {args.repeats} timed runs after the scored one")
    print(f"{'row':<24}{'score':>7}{'answer tok/s':>20}{'seconds':>20}{'peak KV MB':>12}{'held MB':>9}{'tok/step':>10}"
          f"{'identical':>11}")
    for r in rows_out:
        held = f"{r['peak_held_kv_bytes'] / 1e6:.1f}" if r["peak_held_kv_bytes"] else "-"
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        print(f"{r['name']:<24}{r['mean_score']:>7.3f}{format_spread(r['answer_tokens_per_second']):>20}"
              f"{format_spread(r['seconds']):>20}{r['peak_kv_bytes'] / 1e6:>12.1f}{held:>9}{tps:>10}{r['identical'] or '-':>11}")
    res = {"environment": environment({"gguf": default_gguf_path(), "hf_model": hf, "drafter": default_drafter_dir(),
                                       "namm": DEFAULT_NAMM}),
           "engine": engine.info.to_dict(), "rows": rows_out,
           "settings": {"repeats": args.repeats, "tasks": f"make_tasks(lengths={args.lengths}, n={args.n}, seed=2)", "budget": args.budget,
                        "protocol": "chunked", "n_up": 128, "greedy": True, "drafter": "shipped, one beam, adaptive <= 4"}}
    if args.json:
        save_results(args.json, res)
    bad = [r["name"] for r in rows_out if r["identical"] is not None and not r["identical"].startswith(f"{len(samples)}/")]
    if bad:
        print(f"error: drafted output differs from its plain reference: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
