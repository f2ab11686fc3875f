"""ReDrafter on the fast engine against plain decoding on the same engine (and llama.cpp when installed).

    python benchmarks/speculative_engine.py --lengths 3,4 --repeats 5 --json benchmarks/speculative_engine_cpu.json

The shipped drafter, one beam of a fixed length L (the engine's adaptive length is future work), the
default int4 GGUF engine with compiled steps (`--no-compile` for eager), the 6 benchmark prompts x 128
tokens, greedy. Every engine in turn per prompt (order rotated per repeat) after a warm-up pass that also
checks token identity with plain decoding on the same engine; the script exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="3,4", help="Comma-separated beam lengths L (the guaranteed token included).")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from celeris.engine import load_engine
    from celeris.engine.bench import LlamaCpp, environment, llama_cpp_available
    from celeris.generation import encode_prompt, engine_decode, eos_token_ids
    from celeris.io import save_results
    from celeris.models import default_gguf_path
    from celeris.speculative.bench import default_drafter_dir
    from celeris.speculative.decoding import SpeculativeStats
    from celeris.speculative.engine_decoding import load_drafter_for_engine, redrafter_engine_decode
    from celeris.speculative.prompts import evaluation_prompts

    lengths = [int(x) for x in args.lengths.split(",")]
    engine = load_engine(compile=not args.no_compile)
    drafter = load_drafter_for_engine(default_drafter_dir(), engine)
    eos = eos_token_ids(engine.model, engine.tokenizer)
    inputs = [encode_prompt(engine.tokenizer, p) for p in evaluation_prompts()[: args.limit]]
    n = args.max_new_tokens
    table = [("engine-plain", lambda ids, st: engine_decode(engine, ids, n, eos_ids=eos).tolist())]
    for L in lengths:
        table.append((f"engine-redrafter-w1-l{L}",
                      lambda ids, st, L=L: redrafter_engine_decode(engine, drafter, ids, n, 1, L, eos_ids=eos, stats=st).tolist()))
    if llama_cpp_available():
        llama = LlamaCpp(default_gguf_path(), torch.get_num_threads())
        table.append(("llama.cpp", lambda ids, st: llama.generate(ids[0].tolist(), n)))
    names = [t[0] for t in table]
    reference = [engine_decode(engine, ids, n, eos_ids=eos).tolist() for ids in inputs]
    identical, stats = dict.fromkeys(names, 0), {name: SpeculativeStats() for name in names}
    for name, fn in table:  # warm-up (compilation of every verify size) and the identity check
        print(f"warm-up {name} ...", file=sys.stderr, flush=True)
        identical[name] = sum(fn(ids, stats[name]) == ref for ids, ref in zip(inputs, reference, strict=True))
    secs = {name: [0.0] * args.repeats for name in names}
    toks = {name: [0] * args.repeats for name in names}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for i, ids in enumerate(inputs):
            k = (i + r) % len(table)
            for name, fn in table[k:] + table[:k]:
                t0 = time.perf_counter()
                out = fn(ids, SpeculativeStats())
                secs[name][r] += time.perf_counter() - t0
                toks[name][r] += len(out)
    rows = []
    for name in names:
        rates = [t / s for t, s in zip(toks[name], secs[name], strict=True)]
        rows.append({"name": name, "tokens_per_second": {"median": statistics.median(rates), "min": min(rates),
                                                         "max": max(rates), "runs": rates},
                     "identical_to_engine_plain": f"{identical[name]}/{len(inputs)}",
                     "tokens_per_step": stats[name].tokens_per_step or None})
    base = rows[0]["tokens_per_second"]["median"]
    peer = next((r["tokens_per_second"]["median"] for r in rows if r["name"] == "llama.cpp"), None)
    print(f"{'engine':<26}{'tokens/s':>10}{'min-max':>16}{'vs plain':>10}{'vs llama.cpp':>14}{'tok/step':>10}{'identical':>11}")
    for r in rows:
        t = r["tokens_per_second"]
        r["vs_engine_plain"] = t["median"] / base
        if peer:
            r["vs_llama_cpp"] = t["median"] / peer
        vl = f"{r['vs_llama_cpp']:.2f}x" if peer else "-"
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        print(f"{r['name']:<26}{t['median']:>10.1f}{t['min']:>8.1f}-{t['max']:<7.1f}{r['vs_engine_plain']:>9.2f}x{vl:>14}"
              f"{tps:>10}{r['identical_to_engine_plain']:>11}")
    res = {"environment": environment(), "engine": engine.info.to_dict(), "rows": rows,
           "settings": {"max_new_tokens": n, "repeats": args.repeats, "prompts": len(inputs), "beam_width": 1,
                        "lengths": lengths, "compiled": not args.no_compile, "greedy": True}}
    if args.json:
        save_results(args.json, res)
    bad = [r["name"] for r in rows if r["name"] != "llama.cpp" and r["identical_to_engine_plain"] != f"{len(inputs)}/{len(inputs)}"]
    if bad:
        print(f"error: not identical to plain decoding on the engine: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
