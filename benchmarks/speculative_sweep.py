"""Beam-width x beam-length sweep for ReDrafter on validation prompts (not the benchmark's prompts).

    python benchmarks/speculative_sweep.py [DRAFTER_DIR] [--json OUT]

Plain greedy decoding and every (W, L) answer the same 4 validation prompts (96 new tokens), one
pass each after a short warm-up, in one process. Prints tokens/s relative to plain decoding,
tokens per target step and the drafting share of the time; use it to choose the configurations
`celeris bench speculative --configs` measures properly (repeats, held-out prompts).
"""

from __future__ import annotations

import argparse
import time

import torch

from celeris.generation import decode, encode_prompt, eos_token_ids
from celeris.io import write_json
from celeris.models import load_model
from celeris.speculative.bench import default_drafter_dir
from celeris.speculative.decoding import SpeculativeStats, redrafter_decode
from celeris.speculative.drafter import load_drafter
from celeris.speculative.prompts import VALIDATION_PROMPTS

CONFIGS = [(1, 3), (1, 4), (1, 5), (2, 4), (2, 5), (3, 4), (4, 4), (4, 5), (6, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafter", nargs="?", default=str(default_drafter_dir()))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model()
    drafter = load_drafter(args.drafter, model)
    eos = eos_token_ids(model, tok)
    prompts = [encode_prompt(tok, p) for p in VALIDATION_PROMPTS[:4]]
    rows = []
    with torch.inference_mode():
        decode(model, prompts[0], 16, eos_ids=eos)
        redrafter_decode(model, drafter, prompts[0], 16, 2, 4, eos_ids=eos)
        t = time.perf_counter()
        n = sum(decode(model, ids, 96, eos_ids=eos).numel() for ids in prompts)
        base = n / (time.perf_counter() - t)
        print(f"plain greedy: {base:.1f} tokens/s")
        for w, length in CONFIGS:
            st = SpeculativeStats()
            t = time.perf_counter()
            n = sum(redrafter_decode(model, drafter, ids, 96, w, length, eos_ids=eos, stats=st)[0].numel() for ids in prompts)
            rate = n / (time.perf_counter() - t)
            share = st.draft_seconds / max(st.draft_seconds + st.verify_seconds, 1e-9)
            rows.append({"beam_width": w, "beam_length": length, "tokens_per_second": rate, "relative": rate / base,
                         "tokens_per_step": st.tokens_per_step, "draft_share": share})
            print(f"w{w}-l{length}: {rate:5.1f} tokens/s  {rate / base:.2f}x  {st.tokens_per_step:.2f} tokens/step  draft {share:.0%}")
    if args.json:
        write_json(args.json, {"plain_tokens_per_second": base, "configs": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
