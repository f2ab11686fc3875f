"""Beam-width x beam-length sweep for ReDrafter on validation prompts (never the benchmark's prompts).

    OMP_NUM_THREADS=2 python benchmarks/speculative_sweep.py [--drafter DIR] [--repeats 5] [--limit 4]
        [--configs 1x6a,1x2,1x3,1x4,1x5,2x3,2x4,4x4] [--json OUT]

The first --limit hand-written validation prompts (`celeris.speculative.prompts.VALIDATION_PROMPTS`, the split
the drafter's checkpoint is chosen on) are checked to be disjoint from the benchmark prompts
(`EVAL_PROMPTS` and benchmarks/speculative_prompts.jsonl) before anything runs. Plain decoding (HF generate and
celeris-plain) and every (W, L) answer them with the protocol of `celeris bench speculative` (one warm-up pass,
then --repeats interleaved passes, the engine order rotated per prompt; tokens/s as median with min-max, ratios
repeat by repeat). `chosen` in the JSON is the setting with the highest median tokens/s over celeris-plain; that
is what `celeris bench speculative --configs` then measures on the benchmark prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from celeris.errors import CelerisError
from celeris.io import write_json
from celeris.report import REPEATS, check_repeats
from celeris.speculative.bench import (
    default_drafter_dir,
    engine_name,
    format_table,
    load_prompts,
    parse_configs,
    run_speculative_benchmark,
)
from celeris.speculative.prompts import EVAL_PROMPTS, VALIDATION_PROMPTS

BENCHMARK_FILE = Path(__file__).resolve().parent / "speculative_prompts.jsonl"
CONFIGS = "1x6a,1x2,1x3,1x4,1x5,2x3,2x4,4x4"


def validation_rows(limit: int) -> list[dict[str, Any]]:
    """The first `limit` validation prompts, after checking that none is a benchmark prompt."""
    rows = [{"prompt": p} for p in VALIDATION_PROMPTS[:limit]]
    bench = set(EVAL_PROMPTS) | ({r["prompt"] for r in load_prompts(BENCHMARK_FILE) if "prompt" in r}
                                if BENCHMARK_FILE.is_file() else set())
    shared = [r["prompt"] for r in rows if r["prompt"] in bench]
    if shared:
        raise CelerisError(f"{len(shared)} validation prompts are benchmark prompts (e.g. {shared[0]!r}): a sweep must "
                           "not choose settings on the data the benchmark reports")
    return rows


def sweep(model, tokenizer, drafter, rows: list[dict[str, Any]], configs: list[tuple[int, int, bool]],
          max_new_tokens: int = 96, repeats: int = REPEATS, artifacts: dict[str, Any] | None = None,
          progress: bool = True) -> dict[str, Any]:
    """`run_speculative_benchmark` on the validation rows (plain baselines + the ReDrafter settings) and the
    setting it would choose."""
    names = [engine_name(*c) for c in configs]
    res = run_speculative_benchmark(model, tokenizer, rows, drafter, configs, max_new_tokens, repeats,
                                    engines=["celeris-plain", *names], progress=progress, artifacts=artifacts,
                                    prompt_source=f"validation split (VALIDATION_PROMPTS[:{len(rows)}]), disjoint "
                                                  "from the benchmark prompts (checked)")
    drafted = [e for e in res["engines"] if e["name"] in names]
    best = max(drafted, key=lambda e: e["vs_celeris_plain"]["median"])
    res["prompt_split"] = "validation"
    res["chosen"] = {"name": best["name"], "vs_celeris_plain": best["vs_celeris_plain"],
                     "config": list(configs[names.index(best["name"])])}
    return res


def main() -> None:
    from celeris.models import load_model
    from celeris.speculative.drafter import load_drafter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default=str(default_drafter_dir()))
    ap.add_argument("--configs", default=CONFIGS, help="WxL settings; a trailing 'a' adapts the length (one beam).")
    ap.add_argument("--limit", type=int, default=4, help=f"Validation prompts to use (at most {len(VALIDATION_PROMPTS)}).")
    ap.add_argument("--max-new-tokens", "-n", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=REPEATS, help="Timed passes after the warm-up pass.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not 1 <= args.limit <= len(VALIDATION_PROMPTS):
        raise SystemExit(f"error: --limit must be between 1 and {len(VALIDATION_PROMPTS)}")
    try:
        check_repeats(args.repeats)
        rows = validation_rows(args.limit)
        configs = parse_configs(args.configs)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    model, tok = load_model()
    drafter = load_drafter(args.drafter, model)
    with torch.inference_mode():
        res = sweep(model, tok, drafter, rows, configs, args.max_new_tokens, args.repeats,
                    artifacts={"drafter": Path(args.drafter)})
    print(format_table(res))
    c = res["chosen"]["vs_celeris_plain"]
    print(f"chosen on the validation prompts: {res['chosen']['name']} ({c['median']:.2f}x celeris-plain, "
          f"{c['min']:.2f}-{c['max']:.2f})")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
