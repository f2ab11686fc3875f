"""Demo section: CALM generates 4 tokens per backbone step; BrierLM and FLOPs against the Transformer
trained on the same tokens (shipped checkpoints `calm:default` and `calm:baseline`, no training here)."""

from __future__ import annotations

import time

from celeris.calm.bench import PROMPT


def demo_section(ctx) -> None:
    import torch

    from celeris.calm.artifacts import ARTIFACTS, load_any, load_calm
    from celeris.calm.sampling import calm_generate
    from celeris.corpora import load_corpus
    from celeris.generation import decode
    from celeris.io import read_json
    from celeris.metrics import brier_lm
    from celeris.report import line_plot

    n = 32 if ctx.quick else 64
    calm, tok = load_calm("calm:default")
    base, btok = load_any("calm:baseline")
    r = calm_generate(calm, tok, PROMPT, n, temperature=0.5, sampler="batch", num_samples=200)
    r1 = calm_generate(calm, tok, PROMPT, n, temperature=1.0)
    ids = btok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    bnew = decode(base, ids, n, 1.0, (), torch.Generator().manual_seed(0))
    bsec = time.perf_counter() - t0
    btext = btok.decode(bnew.tolist())
    test = load_corpus("python-stdlib").split("test").texts()
    tokens = 2048 if ctx.quick else 4096
    cb, bb = brier_lm(calm, tok, test, max_tokens=tokens), brier_lm(base, btok, test, max_tokens=tokens)

    rep = ctx.report
    rep.section("CALM: 4 tokens per step (continuous autoregression)")
    rep.text(f"A CALM model (K = 4: each step predicts one latent vector that the frozen autoencoder decodes into 4 tokens) "
             f"and a Transformer trained on the same tokens of the standard-library corpus. {n} new tokens: CALM takes "
             f"{r.steps} backbone steps, the Transformer {len(bnew)}. These are tiny CPU models: the text is not fluent.")
    rep.pre(f"CALM, T = 1/2 (batch sampler, 200 samples/step):\n{PROMPT}{r.text}\n\nTransformer, T = 1:\n{PROMPT}{btext}")
    rep.table([{"model": "CALM K=4 (T=1)", "steps": r1.steps, "tokens/s": r1.tokens_per_second, "BrierLM": cb.brierlm,
                "positions": cb.positions},
               {"model": "Transformer (T=1)", "steps": len(bnew), "tokens/s": len(bnew) / bsec, "BrierLM": bb.brierlm,
                "positions": bb.positions}])
    bench = ARTIFACTS / "bench.json"
    if bench.is_file():
        b = read_json(bench, "CALM benchmark")
        curves = {"Transformer": ([p["train_flops"] for p in b["baseline"]["curve"]], [p["brierlm"] for p in b["baseline"]["curve"]]),
                  "CALM (K=4)": ([p["train_flops"] for p in b["calm"]["curve"]], [p["brierlm"] for p in b["calm"]["curve"]])}
        rep.image(line_plot(curves, "training FLOPs", "BrierLM", "BrierLM vs training compute (bench run that built the checkpoints)"),
                  "BrierLM vs FLOPs")
        rep.text(f"From that run: CALM/Transformer training FLOPs {b['ratios']['train_flops']:.2f}, inference FLOPs/token "
                 f"{b['ratios']['inference_flops_per_token']:.2f}, BrierLM {b['ratios']['brierlm']:.2f}.")
    print(f"CALM: {r.steps} steps for {n} tokens ({r1.tokens_per_second:.0f} tok/s at T=1), BrierLM {cb.brierlm:.2f}; "
          f"Transformer: {len(bnew)} steps ({len(bnew) / bsec:.0f} tok/s), BrierLM {bb.brierlm:.2f}")
    ctx.summary["calm"] = {"calm_steps": r.steps, "baseline_steps": len(bnew), "calm_tokens_per_second": r1.tokens_per_second,
                           "baseline_tokens_per_second": len(bnew) / bsec, "calm_brierlm": cb.brierlm, "baseline_brierlm": bb.brierlm}
