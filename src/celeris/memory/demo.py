"""`celeris demo` section: score vs. KV memory for every Celeris policy and kvpress press.

Short synthetic prompts (passkey and multi-needle retrieval, ~400 tokens) so the section fits the
demo's time on a shared CPU; `celeris bench memory` is the full comparison.
"""

from __future__ import annotations

import time

from celeris.memory.evaluate import bench_memory, format_table
from celeris.memory.policies import DEFAULT_NAMM
from celeris.memory.tasks import make_tasks
from celeris.report import line_plot


def demo_section(ctx) -> None:
    model, tok = ctx.default_model()
    t0 = time.perf_counter()
    kinds = ["passkey", "multi_needle"]
    # seed 3: the full cache answers both quick prompts (checked), so the curves can show a drop
    # One prompt per kind and two budgets keep the section near 90 s on 2 cores (`bench memory` is the full run).
    samples = make_tasks(kinds, [384], n=1, seed=3,
                         count_tokens=lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    budgets = [0.25] if ctx.quick else [0.5, 0.25]
    policies = ["streaming_llm", "l2", "h2o", "random"] + (["namm"] if (DEFAULT_NAMM / "namm.json").is_file() else [])
    presses = ["KnormPress", "SnapKVPress", "TOVAPress"] if ctx.quick else None
    protocols = ["press"] if ctx.quick else ["press", "chunked"]
    res = bench_memory(model, tok, samples, budgets, policies, presses, n_up=128, max_new_tokens=12, progress=False,
                       protocols=protocols, repeats=None)  # the scored runs only: the demo's time budget
    table = format_table(res["results"])
    print(table)
    ctx.report.section("Evolved KV memory (NAMM) and the policy zoo")
    ctx.report.text(
        f"{len(samples)} synthetic long-context prompts ({', '.join(kinds)}, ~400 tokens) answered by "
        "SmolLM2-135M-Instruct while each memory policy compresses the context once after a full-attention "
        "prefill (protocol 'press': every kvpress press, and each Celeris policy wrapped as a kvpress ScorerPress)"
        + (" or evicts cached tokens every 128 tokens during chunked prefill and decoding (protocol 'chunked')"
           if "chunked" in protocols else "") + ". "
        "x: peak physical KV bytes / full cache; y: mean score. NAMM uses the shipped evolved parameters "
        "(src/celeris/artifacts/memory). Tiny sample: read trends, not decimals.")
    series: dict[str, tuple[list[float], list[float]]] = {}
    full = res["results"][0]
    for r in res["results"][1:]:
        name = "kvpress:" + r["policy"] if r["kind"] == "kvpress" else f"{r['policy']} ({r['protocol']})"
        xs, ys = series.setdefault(name, ([full["kv_bytes_ratio"]], [full["mean_score"]]))
        xs.append(r["kv_bytes_ratio"])
        ys.append(r["mean_score"])
    ctx.report.image(line_plot(series, "peak KV bytes / full cache", "mean score", "score vs memory"), "score vs memory")
    ctx.report.pre(table)
    ctx.summary["memory"] = {"seconds": time.perf_counter() - t0,
                             "results": [{k: v for k, v in r.items() if k != "per_sample"} for r in res["results"]]}
