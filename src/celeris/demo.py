"""`celeris demo`, the main job: every Celeris system on the real default model, in one HTML report.

The foundation's sections load SmolLM2-135M-Instruct (converting its GGUF once), answer two fixed
prompts with timing, and train a `tiny` Llama on the standard-library corpus for about two minutes.
Each system adds its own section as a module with a `demo_section(ctx)` function, listed in
`SYSTEM_SECTIONS`; a system that is not installed is left out.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celeris.io import write_json
from celeris.report import Report, line_plot

DEMO_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
)
SYSTEM_SECTIONS = (
    "celeris.speculative.demo",
    "celeris.memory.demo",
    "celeris.calm.demo",
    "celeris.curation.demo",
    "celeris.federated.demo",
)


@dataclass
class DemoContext:
    """What sections share: output folder, report, JSON summary, and the default model (loaded once)."""

    out_dir: Path
    report: Report
    train_seconds: float = 120.0
    quick: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    _model: Any = None

    def default_model(self):
        if self._model is None:
            from celeris.models import load_model

            self._model = load_model()
        return self._model


def section_generation(ctx: DemoContext) -> None:
    from celeris.api import generate
    from celeris.engine import load_engine

    t0 = time.perf_counter()
    engine = load_engine(progress=False)  # the fast engine, as `celeris generate` runs it (eager step)
    load_s = time.perf_counter() - t0
    ctx.report.section("1. The default model answers")
    info = engine.info
    ctx.report.text(f"SmolLM2-135M-Instruct on the fast engine ({info.quantize}: the GGUF's own 4-bit blocks, "
                    f"{info.weight_bytes / 1e6:.0f} MB of weights), loaded in {load_s:.1f} s. Greedy decoding, 96 new "
                    "tokens at most. `celeris bench engine` compares it with HF generate and llama.cpp (docs/engine.md).")
    rows = []
    for prompt in DEMO_PROMPTS:
        r = generate(engine, engine.tokenizer, prompt, max_new_tokens=96)
        print(f"\n> {prompt}\n{r.text}\n  [{r.new_tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s]")
        ctx.report.pre(f"> {prompt}\n\n{r.text}")
        rows.append({"prompt": prompt, "new_tokens": r.new_tokens, "seconds": r.seconds, "tokens_per_second": r.tokens_per_second})
    ctx.report.table(rows)
    ctx.summary["generation"] = {"load_seconds": load_s, "engine": info.to_dict(), "answers": rows}


def section_training(ctx: DemoContext) -> None:
    from celeris.lm import train_lm
    from celeris.trainer import TrainConfig

    run_dir = ctx.out_dir / "tiny-lm"
    seconds = 20.0 if ctx.quick else ctx.train_seconds
    cfg = TrainConfig(max_steps=100_000, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=25, eval_batches=4,
                      max_seconds=seconds, desc="train tiny LM")
    # Bound the tokenized training set to what the time budget can use (a tiny model does ~10-20k tokens/s here).
    res = train_lm(run_dir, corpus="python-stdlib", size="tiny", vocab_size=4096, seq_len=128, config=cfg,
                   max_train_tokens=int(seconds * 40_000), overwrite=True)
    vals = [h for h in res.history if h.get("event") == "val"]
    ctx.report.section("2. Training a tiny model from scratch")
    ctx.report.text(
        f"A tiny Llama (3.1M non-embedding parameters, 4096-token BPE trained on the corpus) on the Python "
        f"standard library for {res.seconds:.0f} s: {res.steps} steps, {res.tokens:,} tokens, "
        f"{res.flops:.3g} training FLOPs (6ND {res.flops_dense:.3g} + attention {res.flops_attention:.3g}), "
        f"{res.tokens_per_second:,.0f} tokens/s. Validation loss {vals[0]['val_loss']:.3f} → {vals[-1]['val_loss']:.3f}."
    )
    ctx.report.image(line_plot({"validation loss": ([v["step"] for v in vals], [v["val_loss"] for v in vals])},
                               "step", "validation loss (nats/token)", "tiny LM on python-stdlib"), "validation loss curve")
    ctx.report.table([{"step": v["step"], "tokens": v["tokens"], "FLOPs": v["flops"], "val_loss": v["val_loss"]} for v in vals])
    print(f"\ntiny LM: validation loss {vals[0]['val_loss']:.3f} -> {vals[-1]['val_loss']:.3f} in {res.steps} steps "
          f"({res.seconds:.0f} s, {res.flops:.3g} FLOPs); model saved to {run_dir}")
    ctx.summary["training"] = {**res.to_dict(), "history": vals}


def sections() -> list[tuple[str, Callable[[DemoContext], None]]]:
    found: list[tuple[str, Callable[[DemoContext], None]]] = [("generation", section_generation), ("training", section_training)]
    for mod in SYSTEM_SECTIONS:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is not None and importlib.util.find_spec(mod) is not None:
            found.append((mod.split(".")[1], importlib.import_module(mod).demo_section))
    return found


def demo(out_dir: str | Path = "celeris-demo", train_seconds: float = 120.0, quick: bool = False,
         only: list[str] | None = None) -> Path:
    """Run every demo section, write `out_dir/report.html` and `summary.json`; returns the report path.

    A section that fails is reported (in the HTML and on stderr) and the others still run; the
    function then raises so the command exits non-zero.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out, Report("Celeris demo"), train_seconds=train_seconds, quick=quick)
    failed = []
    start = time.perf_counter()
    for name, fn in sections():
        if only and name not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            fn(ctx)
        except Exception as exc:
            failed.append(name)
            ctx.report.section(f"{name}: failed")
            ctx.report.pre(traceback.format_exc())
            print(f"demo section {name} failed: {exc}")
        ctx.summary.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    ctx.summary["total_seconds"] = time.perf_counter() - start
    write_json(out / "summary.json", ctx.summary)
    path = ctx.report.write(out / "report.html")
    print(f"\nReport: {path.resolve()}  ({ctx.summary['total_seconds']:.0f} s)")
    if failed:
        from celeris.errors import CelerisError

        raise CelerisError(f"demo sections failed: {', '.join(failed)} (details in {path})")
    return path

