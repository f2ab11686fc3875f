"""What drafting accuracy does a 2.5x speed-up need on this machine? The real ReDrafter loop, with oracle drafts.

    python benchmarks/speculative_ceiling.py [--limit 4] [--repeats 5] [--alphas 0.6,0.8,0.9,1.0]
                                             [--lengths 4,6,8] [--json OUT]

The decoding loop is `celeris.speculative.decoding.redrafter_decode`, unchanged, on the default model
with the shipped drafter, beam width 1. Only the drafted tokens are replaced: the shipped drafter still
runs its beam search every step (so drafting costs what it really costs), then its beam is overwritten
by the target's own greedy answer (known from a plain greedy run), where each drafted token after the
guaranteed one is right with probability alpha (independently, seeded) until the first wrong one.
Expected tokens per step are then 1 + alpha + ... + alpha^(L-1). The target forwards, the tree mask,
the cache bookkeeping and the acceptance rule are the real ones, so the timings measure what the loop
would deliver with a drafter of that accuracy on this hardware. Every output is checked against plain
greedy decoding.

Timing protocol as in `celeris bench speculative`: the same prompts (the first --limit benchmark
prompts), greedy, batch 1, 128 new tokens, one warm-up pass, then --repeats passes interleaved prompt by
prompt with the engine order rotated (default 5); tokens/s is the median over repeats with min-max; speed-ups
over HF `generate` and over `celeris-plain` (our own plain loop, the floor ReDrafter's loop builds on) are taken
pass by pass. The real drafter (W = 1, L = 4) runs beside the oracles. The JSON carries the environment record.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import celeris.speculative.decoding as D
from celeris.errors import CelerisError
from celeris.generation import decode, eos_token_ids
from celeris.io import write_json
from celeris.models import load_model
from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread
from celeris.speculative.bench import default_drafter_dir, encode_row, load_prompts
from celeris.speculative.drafter import load_drafter


class OracleDrafts:
    """Patches the loop's `beam_search` / `keep_cache_entries` so that beam 0 follows `ref` with accuracy alpha."""

    def __init__(self, ref: torch.Tensor, alpha: float, seed: int, vocab: int) -> None:
        self.ref, self.alpha, self.rng, self.vocab, self.pos = ref.tolist(), alpha, random.Random(seed), vocab, 0

    def beam_search(self, drafter, h, g0, W, L):
        beams = REAL_BEAM_SEARCH(drafter, h, g0, W, L)  # the real drafting cost
        if self.pos < len(self.ref) and int(g0[0]) != self.ref[self.pos]:
            raise RuntimeError("oracle lost track of the committed position")
        for i in range(1, L):
            j = self.pos + i
            if j >= len(self.ref):
                break
            right = self.rng.random() < self.alpha
            beams[0, 0, i] = self.ref[j] if right else (self.ref[j] + 1) % self.vocab
            if not right:
                break
        return beams

    def keep_cache_entries(self, cache, start, path):
        self.pos += path.shape[1]  # the root plus the accepted drafted tokens: all committed
        return REAL_KEEP(cache, start, path)

    def __enter__(self):
        D.beam_search, D.keep_cache_entries = self.beam_search, self.keep_cache_entries
        return self

    def __exit__(self, *exc):
        D.beam_search, D.keep_cache_entries = REAL_BEAM_SEARCH, REAL_KEEP


REAL_BEAM_SEARCH, REAL_KEEP = D.beam_search, D.keep_cache_entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="benchmarks/speculative_prompts.jsonl")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=REPEATS, help="Timed passes after the warm-up pass.")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--alphas", default="0.6,0.8,0.9,1.0")
    ap.add_argument("--lengths", default="4,6,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        check_repeats(args.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    drafter = load_drafter(default_drafter_dir(), model)
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    n = args.max_new_tokens
    inputs = [encode_row(tok, r) for r in load_prompts(args.prompts)[: args.limit]]
    with torch.inference_mode():
        refs = [decode(model, ids, n, eos_ids=eos) for ids in inputs]
    vocab = model.get_output_embeddings().weight.shape[0]

    def hf(ids, i, r):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        return out[0, ids.shape[1]:], None

    def plain(ids, i, r):
        return decode(model, ids, n, eos_ids=eos), None

    def redrafter(alpha, L):
        def run(ids, i, r):
            st = D.SpeculativeStats()
            if alpha is None:
                return D.redrafter_decode(model, drafter, ids, n, 1, L, eos_ids=eos, stats=st)[0], st
            with OracleDrafts(refs[i], alpha, seed=1000 * r + i, vocab=vocab):
                return D.redrafter_decode(model, drafter, ids, n, 1, L, eos_ids=eos, stats=st)[0], st
        return run

    alphas = [float(a) for a in args.alphas.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    engines = [("hf-generate", None, None, hf), ("celeris-plain", None, None, plain),
               ("redrafter-w1-l4 (shipped drafter)", None, 4, redrafter(None, 4))]
    engines += [(f"oracle a={a:g} L={L}", a, L, redrafter(a, L)) for a in alphas for L in lengths]
    names = [e[0] for e in engines]
    acc = {nm: {"secs": [0.0] * args.repeats, "tokens": [0] * args.repeats, "steps": 0, "draft": 0.0, "verify": 0.0}
           for nm in names}
    identical = dict.fromkeys(names, True)
    with torch.inference_mode():
        for r in range(-1, args.repeats):  # -1: warm-up and identity check
            for i, ids in enumerate(inputs):
                k = (i + max(r, 0)) % len(engines)
                for nm, _, _, fn in engines[k:] + engines[:k]:
                    t0 = time.perf_counter()
                    out, st = fn(ids, i, r)
                    dt = time.perf_counter() - t0
                    if r < 0:
                        identical[nm] &= torch.equal(out, refs[i])
                        continue
                    a = acc[nm]
                    a["secs"][r] += dt
                    a["tokens"][r] += out.numel()
                    if st is not None:
                        a["steps"] += st.steps
                        a["draft"] += st.draft_seconds
                        a["verify"] += st.verify_seconds
            print(f"pass {r + 1}/{args.repeats} done", flush=True)
    rows = []
    for nm, alpha, L, _ in engines:
        a = acc[nm]
        rates = [t / s for t, s in zip(a["tokens"], a["secs"], strict=True)]
        row = {"name": nm, "alpha": alpha, "beam_length": L, "tokens_per_second": spread(rates),
               "identical_to_greedy": bool(identical[nm])}
        if a["steps"]:
            steps = a["steps"] / args.repeats
            row.update(tokens_per_step=(sum(a["tokens"]) / args.repeats - len(inputs)) / steps,
                       ms_per_step=1e3 * (a["draft"] + a["verify"]) / args.repeats / steps,
                       draft_ms_per_step=1e3 * a["draft"] / args.repeats / steps)
        if alpha is not None:
            row["expected_tokens_per_step"] = sum(alpha**i for i in range(L))
        rows.append(row)
    base, plain_rate = rows[0]["tokens_per_second"], rows[1]["tokens_per_second"]
    plain_ms = 1e3 / base["median"]
    print(f"median (min-max) of {args.repeats} passes after a warm-up; ratios pass by pass")
    print(f"{'engine':<36}{'tokens/s':>20}{'vs hf-generate':>20}{'vs celeris-plain':>20}{'tok/step':>10}{'step ms':>9}"
          f"{'step/plain':>11}  identical")
    for row in rows:
        row["speedup"] = ratio(row["tokens_per_second"], base)
        row["vs_celeris_plain"] = ratio(row["tokens_per_second"], plain_rate)
        tps = f"{row['tokens_per_step']:.2f}" if "tokens_per_step" in row else "-"
        ms = f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else f"{plain_ms:.1f}"
        rel = f"{row['ms_per_step'] / plain_ms:.2f}" if "ms_per_step" in row else "1.00"
        print(f"{row['name']:<36}{format_spread(row['tokens_per_second']):>20}{format_spread(row['speedup'], 2):>20}"
              f"{format_spread(row['vs_celeris_plain'], 2):>20}{tps:>10}{ms:>9}{rel:>11}  {row['identical_to_greedy']}")
    if args.json:
        write_json(args.json, {"environment": environment({"model": model, "drafter": default_drafter_dir(),
                                                           "prompts": args.prompts}),
                               "engines": rows, "settings": {
            "prompts": len(inputs), "prompt_source": f"{args.prompts}, first {args.limit} (benchmark split; nothing is "
                                                      "chosen on them here)", "repeats": args.repeats, "warmup_passes": 1,
            "max_new_tokens": n, "threads": args.threads, "beam_width": 1,
            "plain_ms_per_token": plain_ms, "plain_ms_per_token_is": "1000 / median hf-generate tokens/s"}})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
