"""`celeris demo` section: the same answer plain and with the shipped drafter, timings, and all engines."""

from __future__ import annotations

import time

import torch


def demo_section(ctx) -> None:
    from celeris.api import generate
    from celeris.report import bar_plot
    from celeris.speculative.bench import default_drafter_dir, engine_name, run_speculative_benchmark
    from celeris.speculative.decoding import default_beam_settings
    from celeris.speculative.drafter import load_drafter
    from celeris.speculative.prompts import EVAL_PROMPTS

    model, tok = ctx.default_model()
    ctx.report.section("Recurrent drafting (ReDrafter): faster answers, same text")
    drafter_dir = default_drafter_dir()
    if not (drafter_dir / "drafter.json").is_file():
        ctx.report.text(f"No shipped drafter in {drafter_dir}; train one with `celeris drafter train --out DIR`.")
        return
    t0 = time.perf_counter()
    drafter = load_drafter(drafter_dir, model)
    load_s = time.perf_counter() - t0
    n = 48 if ctx.quick else 96
    W, L, adaptive = default_beam_settings(next(model.parameters()).device)  # what `celeris generate --drafter` uses
    name = engine_name(W, L, adaptive).removeprefix("redrafter-")
    prompt = EVAL_PROMPTS[0]  # held out from the drafter's training prompts
    generate(model, tok, prompt, max_new_tokens=8)  # warm-up, excluded from the timings
    generate(model, tok, prompt, max_new_tokens=8, drafter=drafter)  # the defaults, as `celeris generate --drafter`
    plains, fasts = [], []
    for _ in range(3):  # interleaved, so both see the same machine load; the median run of each is reported
        plains.append(generate(model, tok, prompt, max_new_tokens=n))
        fasts.append(generate(model, tok, prompt, max_new_tokens=n, drafter=drafter))
    plain = sorted(plains, key=lambda r: r.seconds)[1]
    fast = sorted(fasts, key=lambda r: r.seconds)[1]
    same = plain.token_ids == fast.token_ids
    speedup = plain.seconds / fast.seconds if fast.seconds > 0 else 0.0
    print(f"\n> {prompt}\n{fast.text}\n  [plain {plain.seconds:.2f} s, ReDrafter {name} {fast.seconds:.2f} s: "
          f"{speedup:.2f}x, {fast.stats['tokens_per_step']:.2f} tokens/step, identical={same}]")
    ctx.report.text(f"Drafter loaded in {load_s:.2f} s ({drafter.num_parameters() / 1e6:.1f} M parameters, draft vocabulary "
                    f"{drafter.config.draft_vocab_size}). Greedy, {n} new tokens at most, on a prompt held out from training.")
    ctx.report.pre(f"> {prompt}\n\n{fast.text}")
    ctx.report.table([
        {"engine": "plain greedy", "seconds": round(plain.seconds, 2), "tokens_per_second": round(plain.tokens_per_second, 1),
         "tokens_per_step": 1.0},
        {"engine": f"ReDrafter {name}", "seconds": round(fast.seconds, 2), "tokens_per_second": round(fast.tokens_per_second, 1),
         "tokens_per_step": round(fast.stats["tokens_per_step"], 2)},
    ])
    ctx.report.text(f"Identical output: {same}. Speedup on this answer: {speedup:.2f}x (median of 3 interleaved runs after a "
                    "warm-up; timings on a shared CPU).")
    rows = [{"prompt": EVAL_PROMPTS[1]}]  # one more held-out prompt; a short run to stay within the demo's budget
    configs = sorted({(W, L, adaptive), (1, 4, False), (2, 3, False)})  # the default, one fixed beam, a two-beam tree
    with torch.inference_mode():
        res = run_speculative_benchmark(model, tok, rows, drafter, configs, max_new_tokens=n // 2, repeats=1, progress=False,
                                        engines=["hf-generate", "hf-prompt-lookup"] + [engine_name(*c) for c in configs])
    ctx.report.image(bar_plot({r["name"]: r["tokens_per_second"]["median"] for r in res["engines"]}, ylabel="tokens/s",
                              title="Greedy tokens/s by engine (one timed run each)"), "ReDrafter vs Hugging Face decoders")
    ctx.report.table([{k: (round(v["median"] if isinstance(v, dict) else v, 3) if isinstance(v, dict | float) else v)
                       for k, v in r.items()
                       if k in ("name", "tokens_per_second", "speedup", "tokens_per_step", "identical_to_greedy", "packing_saving")}
                      for r in res["engines"]])
    ctx.summary["speculative"] = {"prompt": prompt, "identical": same, "plain_seconds": plain.seconds,
                                  "redrafter_seconds": fast.seconds, "speedup": speedup,
                                  "tokens_per_step": fast.stats["tokens_per_step"], "engines": res["engines"]}
