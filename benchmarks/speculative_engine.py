"""ReDrafter on the fast engine against plain decoding on the same engine, its oracle ceiling, and llama.cpp.

    python benchmarks/speculative_engine.py --repeats 5 --json benchmarks/speculative_engine_cpu.json

Rows, all on the default int4 GGUF engine with compiled steps (`--no-compile` for eager), the first 6 benchmark
prompts (`EVAL_PROMPTS`, disjoint from the validation prompts the drafter and its settings were chosen on) x 128
tokens, greedy, batch 1:
- engine-plain: `engine_decode` (one compiled step per token);
- engine-redrafter-adaptive: the shipped drafter, one beam, the draft length chosen per step (1..4) from its
  confidence and the verify costs measured on this engine (`celeris generate --drafter default`);
- engine-redrafter-w1-lL: one beam of fixed length L (--lengths);
- engine-oracle-aA-lL: the ceiling. The shipped drafter still runs every step (its cost is paid), then its
  beam is overwritten by plain decoding's own continuation, each drafted token right with probability A
  (seeded) until the first wrong one: what a drafter of that accuracy would deliver here (--alphas);
- llama.cpp and llama.cpp-prompt-lookup (llama-cpp-python's `LlamaPromptLookupDecoding`, 2 drafted tokens:
  its documented setting for CPU-only machines), when llama-cpp-python is installed (`make peers`).
Every row in turn per prompt (order rotated per repeat) after a warm-up pass that also checks token
identity with plain decoding on the same engine; tokens/s is the median of the repeats, min-max shown, and each
ratio is taken repeat by repeat. The JSON carries the environment record (commit, machine, versions, sha256 of
the GGUF and the drafter).
The script exits 1 when a Celeris row is not identical to plain decoding on every prompt.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


class OracleDrafts:
    """Within the block, the engine loop's beams are the real drafter's, then overwritten by `truth` (prompt +
    plain decoding's answer) from the engine's position on, each drafted token right with probability `alpha`
    until the first wrong one (a wrong token is the true one + 1)."""

    def __init__(self, engine, truth: torch.Tensor, alpha: float, seed: int):
        import random

        self.engine, self.truth, self.alpha, self.rng = engine, truth, alpha, random.Random(seed)

    def beam_search(self, drafter, h, g0, W, L, **kw):
        beams = self._real(drafter, h, g0, W, L, **kw)  # the drafter's cost is paid
        beams = beams[0] if isinstance(beams, tuple) else beams
        pos = self.engine.filled  # g0 sits at this slot
        for j in range(1, L):
            if pos + j >= self.truth.numel():
                break
            right = self.rng.random() < self.alpha
            beams[0, 0, j] = self.truth[pos + j] if right else (self.truth[pos + j] + 1) % drafter.embedding.shape[0]
            if not right:
                break
        return beams

    def __enter__(self):
        import celeris.speculative.engine_decoding as ED

        self._real = ED.beam_search
        ED.beam_search = self.beam_search
        return self

    def __exit__(self, *exc):
        import celeris.speculative.engine_decoding as ED

        ED.beam_search = self._real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2,3,4", help="Comma-separated fixed beam lengths L (the guaranteed token included).")
    ap.add_argument("--alphas", default="1.0,0.8", help="Comma-separated oracle accuracies for the ceiling rows (L = 4).")
    ap.add_argument("--repeats", type=int, default=5, help="Timed passes after the warm-up pass.")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from celeris.engine import load_engine
    from celeris.engine.bench import LlamaCpp, llama_cpp_available
    from celeris.errors import CelerisError
    from celeris.generation import encode_prompt, engine_decode, eos_token_ids
    from celeris.io import save_results
    from celeris.models import default_gguf_path
    from celeris.report import check_repeats, environment, format_spread, ratio, spread
    from celeris.speculative.bench import default_drafter_dir
    from celeris.speculative.decoding import SpeculativeStats
    from celeris.speculative.engine_decoding import load_drafter_for_engine, redrafter_engine_decode
    from celeris.speculative.prompts import EVAL_PROMPTS

    try:
        check_repeats(args.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    lengths = [int(x) for x in args.lengths.split(",")]
    engine = load_engine(compile=not args.no_compile)
    drafter = load_drafter_for_engine(default_drafter_dir(), engine)
    eos = eos_token_ids(engine.model, engine.tokenizer)
    inputs = [encode_prompt(engine.tokenizer, p) for p in EVAL_PROMPTS[: args.limit]]
    n = args.max_new_tokens
    alphas = [float(x) for x in args.alphas.split(",") if x]
    reference = [engine_decode(engine, ids, n, eos_ids=eos).tolist() for ids in inputs]
    table = [("engine-plain", lambda ids, st: engine_decode(engine, ids, n, eos_ids=eos).tolist())]
    table.append(("engine-redrafter-adaptive", lambda ids, st: redrafter_engine_decode(
        engine, drafter, ids, n, 1, 4, eos_ids=eos, stats=st, adaptive=True).tolist()))
    for L in lengths:
        table.append((f"engine-redrafter-w1-l{L}",
                      lambda ids, st, L=L: redrafter_engine_decode(engine, drafter, ids, n, 1, L, eos_ids=eos, stats=st).tolist()))
    for a in alphas:
        def oracle(ids, st, a=a):
            i = next(j for j, x in enumerate(inputs) if x is ids)
            with OracleDrafts(engine, torch.cat([ids[0], torch.tensor(reference[i])]), a, seed=i):
                return redrafter_engine_decode(engine, drafter, ids, n, 1, 4, eos_ids=eos, stats=st).tolist()
        table.append((f"engine-oracle-a{a:g}-l4", oracle))
    if llama_cpp_available():
        llama = LlamaCpp(default_gguf_path(), torch.get_num_threads())
        lookup = LlamaCpp(default_gguf_path(), torch.get_num_threads(), prompt_lookup=2)
        table.append(("llama.cpp", lambda ids, st: llama.generate(ids[0].tolist(), n)))
        table.append(("llama.cpp-prompt-lookup", lambda ids, st: lookup.generate(ids[0].tolist(), n)))
    else:
        print("llama-cpp-python is not installed (`make peers`): no llama.cpp rows", file=sys.stderr)
    names = [t[0] for t in table]
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
        rows.append({"name": name, "tokens_per_second": spread(rates),
                     "identical_to_engine_plain": f"{identical[name]}/{len(inputs)}",
                     "tokens_per_step": stats[name].tokens_per_step or None})
    base = rows[0]["tokens_per_second"]
    peer = next((r["tokens_per_second"] for r in rows if r["name"] == "llama.cpp"), None)
    print(f"median (min-max) of {args.repeats} repeats after a warm-up; ratios repeat by repeat")
    print(f"{'engine':<28}{'tokens/s':>20}{'vs plain':>20}{'vs llama.cpp':>20}{'tok/step':>10}{'identical':>11}")
    for r in rows:
        r["vs_engine_plain"] = ratio(r["tokens_per_second"], base)
        if peer:
            r["vs_llama_cpp"] = ratio(r["tokens_per_second"], peer)
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        print(f"{r['name']:<28}{format_spread(r['tokens_per_second']):>20}{format_spread(r['vs_engine_plain'], 2):>20}"
              f"{format_spread(r.get('vs_llama_cpp'), 2):>20}{tps:>10}{r['identical_to_engine_plain']:>11}")
    res = {"environment": environment({"gguf": default_gguf_path(), "drafter": default_drafter_dir()}),
           "engine": engine.info.to_dict(), "rows": rows,
           "settings": {"max_new_tokens": n, "repeats": args.repeats, "prompts": len(inputs),
                        "prompt_source": f"benchmark split (EVAL_PROMPTS[:{len(inputs)}])", "beam_width": 1,
                        "lengths": lengths, "adaptive_max_length": 4, "oracle_alphas": alphas, "oracle_length": 4,
                        "llama_cpp_prompt_lookup_tokens": 2, "compiled": not args.no_compile, "greedy": True}}
    if args.json:
        save_results(args.json, res)
    bad = [r["name"] for r in rows if not r["name"].startswith("llama.cpp") and r["identical_to_engine_plain"] != f"{len(inputs)}/{len(inputs)}"]
    if bad:
        print(f"error: not identical to plain decoding on the engine: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
