"""`celeris bench calm`: a Transformer baseline and CALM (K = 4) trained on the same tokens, side by side.

Both models see the same token blocks in the same order (same tokenizer, same Trainer seed, same
steps × batch), with a constant learning rate after warm-up so that training can be cut into stages:
after every stage both are scored on held-out text (BrierLM, and cross-entropy for the baseline),
which gives the BrierLM-vs-training-FLOPs curves and the BrierLM/cross-entropy correlation across
checkpoints of one run. FLOPs count every part (see `celeris.calm.train`). Generation speed is
measured on the same prompt and the same number of new tokens: one warm-up run each, then `repeats` runs
(default 5) alternating the two models; tokens/s is `{"median", "min", "max", "runs"}` and the speed-up is
taken run by run. Training wall time (`train_seconds`) is one run's cost, not a repeated measurement.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from celeris.calm.model import CALM, CALMConfig, calm_loss
from celeris.calm.train import calm_inference_flops_per_token, calm_training_flops_per_token, token_data
from celeris.compute import inference_flops_per_token, training_flops_per_token
from celeris.corpora import load_corpus
from celeris.errors import CelerisError
from celeris.io import write_json
from celeris.metrics import brier_lm, cross_entropy
from celeris.report import REPEATS, check_repeats, environment, format_spread, interleaved, ratio
from celeris.trainer import TrainConfig, Trainer

BASELINE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=384)
CALM_DEFAULT = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=384, num_mlp_layers=1, num_samples=8)
PROMPT = "def main(args):\n    "


def _baseline_model(vocab: int, seed: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # Untied output layer, as in the paper's baselines (it is a real d·V matmul per token, counted in FLOPs).
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False,
                                     rms_norm_eps=1e-5, bos_token_id=None, pad_token_id=None, **BASELINE))
    m.config.eos_token_id = m.generation_config.eos_token_id = eos
    return m


def _staged(make_trainer, stages: list[int], evaluate) -> list[dict[str, Any]]:
    """Train to each step count in `stages` (resuming the same run) and evaluate after each.

    Each point scores the weights *at that step*: the Trainer's export restores its best checkpoint
    (by validation loss) into the model, so the step's own weights are reloaded from its checkpoint.
    """
    from safetensors.torch import load_model as st_load_model

    points = []
    for end in stages:
        trainer = make_trainer(end)
        res = trainer.train().raise_if_interrupted()
        st_load_model(trainer.accelerator.unwrap_model(trainer.model), str(trainer.checkpoint_dir / "model.safetensors"))
        points.append({"step": res.steps, "tokens": res.tokens, "train_flops": res.flops,
                       "val_loss": res.final_val_loss, **evaluate()})
        print(f"  step {res.steps}: {points[-1]}", flush=True)
    return points


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ta, tb = ta - ta.mean(), tb - tb.mean()
    den = float(ta.norm() * tb.norm())
    return float((ta * tb).sum()) / den if den > 0 else float("nan")


def bench_calm(out_dir: str | Path, ae_dir: str | Path, corpus: str = "python-stdlib", steps: int = 600,
               stages: int = 4, batch_size: int = 16, seq_len: int = 128, lr: float = 2e-3, eval_tokens: int = 16_384,
               gen_tokens: int = 64, calm_config: dict[str, Any] | None = None, seed: int = 0,
               ship: str | Path | None = None, repeats: int = REPEATS) -> dict[str, Any]:
    """Train both models on the same tokens and compare them; writes `out_dir/bench.json` and `report.html`."""
    check_repeats(repeats)
    from transformers import AutoTokenizer

    from celeris.calm.artifacts import tokenizer_dir
    from celeris.calm.autoencoder import Autoencoder
    from celeris.calm.sampling import calm_generate
    from celeris.generation import decode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ae = Autoencoder.load(ae_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(Path(ae_dir)))
    K = ae.config.patch_size
    data = load_corpus(corpus)
    train, val = token_data(data, tok, seq_len, steps * batch_size * seq_len, max_val_tokens=8 * batch_size * seq_len)
    test_texts = data.split("test").texts()
    if len(train) < steps * batch_size:
        print(f"note: {len(train)} training blocks, fewer than steps × batch = {steps * batch_size}; examples repeat")
    marks = sorted({max(1, round(steps * (i + 1) / stages)) for i in range(stages)})
    cfg = dict(batch_size=batch_size, lr=lr, min_lr_ratio=1.0, warmup_steps=min(50, steps // 10), eval_batches=8,
               seed=seed, progress=False)

    # ---- baseline -------------------------------------------------------------------------------------
    print("baseline Transformer:", flush=True)
    base = _baseline_model(len(tok), seed, tok.eos_token_id)
    base_fpt = training_flops_per_token(base, seq_len)

    def base_trainer(end: int) -> Trainer:
        return Trainer(base, train, val, out / "baseline", TrainConfig(max_steps=end, eval_every=end, desc="baseline", **cfg),
                       flops_per_token=base_fpt, tokenizer=tok)

    def base_eval() -> dict[str, float]:
        b = brier_lm(base, tok, test_texts, block_size=seq_len, max_tokens=eval_tokens, seed=seed)
        return {"brierlm": b.brierlm, "brier": b.brier, "brier_stderr": b.brier_stderr, "positions": b.positions,
                "cross_entropy": cross_entropy(base, tok, test_texts, seq_len, eval_tokens)}

    t0 = time.perf_counter()
    base_points = _staged(base_trainer, marks, base_eval)
    base_seconds = time.perf_counter() - t0

    # ---- CALM -----------------------------------------------------------------------------------------
    print("CALM:", flush=True)
    torch.manual_seed(seed)
    ccfg = CALMConfig(vocab_size=ae.config.vocab_size, patch_size=K, latent_size=ae.config.latent_size,
                      eos_token_id=tok.eos_token_id, **{**CALM_DEFAULT, **(calm_config or {})})
    calm = CALM(ccfg, ae)
    calm_fpt = calm_training_flops_per_token(calm, seq_len // K)

    def calm_trainer(end: int) -> Trainer:
        return Trainer(calm, train, val, out / "calm", TrainConfig(max_steps=end, eval_every=end, desc="CALM", **cfg),
                       loss_fn=calm_loss, flops_per_token=calm_fpt, export_fn=lambda m, d: m.save(d), tokenizer=tok)

    def calm_eval() -> dict[str, float]:
        b = brier_lm(calm, tok, test_texts, block_size=seq_len, max_tokens=eval_tokens, seed=seed)
        return {"brierlm": b.brierlm, "brier": b.brier, "brier_stderr": b.brier_stderr, "positions": b.positions}

    t0 = time.perf_counter()
    calm_points = _staged(calm_trainer, marks, calm_eval)
    calm_seconds = time.perf_counter() - t0

    # ---- inference cost and generation speed -----------------------------------------------------------
    base_inf = inference_flops_per_token(base, seq_len)
    calm_inf = calm_inference_flops_per_token(calm, seq_len // K)
    prompt_ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]

    steps = {}

    def run_base() -> float:
        g = torch.Generator().manual_seed(seed)
        t = time.perf_counter()
        n = len(decode(base, prompt_ids, gen_tokens, 1.0, (), g))
        steps["baseline"] = n  # one forward per token: n steps
        return n / (time.perf_counter() - t)

    def run_calm() -> float:
        r = calm_generate(calm, tok, PROMPT, gen_tokens, temperature=1.0, seed=seed)
        steps["calm"] = r.steps
        return r.tokens_per_second

    speed = interleaved({"baseline": run_base, "calm": run_calm}, repeats)
    base_tps, calm_tps = speed["baseline"], speed["calm"]
    base_steps, calm_steps = steps["baseline"], steps["calm"]
    sample = calm_generate(calm, tok, PROMPT, gen_tokens, temperature=0.5, sampler="batch", seed=seed)

    bl, cl = base_points[-1], calm_points[-1]
    result = {
        "environment": environment({"autoencoder": ae_dir}), "repeats": repeats,
        "corpus": corpus, "tokenizer_vocab": len(tok), "K": K, "seq_len": seq_len, "steps": steps, "batch_size": batch_size,
        "train_tokens_each": bl["tokens"], "eval_tokens": eval_tokens,
        "baseline": {"config": BASELINE, "params_non_embedding": base_fpt.n_params, "train_flops": bl["train_flops"],
                     "train_flops_per_token": base_fpt.total, "inference_flops_per_token": base_inf.total,
                     "brierlm": bl["brierlm"], "brier": bl["brier"], "positions": bl["positions"],
                     "cross_entropy": bl["cross_entropy"], "generation_steps": base_steps,
                     "generation_tokens_per_second": base_tps, "train_seconds": base_seconds, "curve": base_points},
        "calm": {"config": {**CALM_DEFAULT, **(calm_config or {})}, "params": calm_fpt.n_params, "train_flops": cl["train_flops"],
                 "train_flops_per_token": calm_fpt.total, "inference_flops_per_token": calm_inf.total,
                 "brierlm": cl["brierlm"], "brier": cl["brier"], "positions": cl["positions"],
                 "generation_steps": calm_steps, "generation_tokens_per_second": calm_tps, "train_seconds": calm_seconds,
                 "sample_T0.5": sample.text, "curve": calm_points},
        "ratios": {"brierlm": cl["brierlm"] / bl["brierlm"] if bl["brierlm"] > 0 else float("nan"),
                   "train_flops": cl["train_flops"] / bl["train_flops"],
                   "inference_flops_per_token": calm_inf.total / base_inf.total,
                   "generation_steps": calm_steps / base_steps, "generation_speedup": ratio(calm_tps, base_tps)},
        "correlation_brierlm_vs_ce_baseline": _pearson([p["brierlm"] for p in base_points], [p["cross_entropy"] for p in base_points]),
        "generation_new_tokens": gen_tokens, "ceil_n_over_k": math.ceil(gen_tokens / K),
    }
    write_json(out / "bench.json", result)
    _report(out, result)
    if ship:
        ship_artifacts(Path(ship), out / "calm", out / "baseline")
        write_json(Path(ship) / "bench.json", result)
    return result


def ship_artifacts(dest: Path, calm_dir: Path, base_dir: Path) -> None:
    """Copy the two trained models into the package's artifact folder, as bfloat16 safetensors (size cap)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celeris.io import atomic_dir

    calm = CALM.load(calm_dir)
    tok = AutoTokenizer.from_pretrained(calm_dir)
    with atomic_dir(dest / "default") as tmp:
        calm.to(torch.bfloat16).save(tmp)  # loaded back as float32
        tok.save_pretrained(tmp)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with atomic_dir(dest / "baseline") as tmp:
        base.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    for junk in ("chat_template.jinja",):
        for p in dest.rglob(junk):
            p.unlink()
    shutil.rmtree(dest / "default" / "checkpoint", ignore_errors=True)


def _report(out: Path, r: dict[str, Any]) -> None:
    from celeris.report import Report, line_plot

    rep = Report("CALM vs Transformer on the same tokens")
    rep.section("Summary")
    b, c = r["baseline"], r["calm"]
    rows = [{"model": name, "BrierLM": m["brierlm"], "train FLOPs": m["train_flops"],
             "inference FLOPs/token": m["inference_flops_per_token"], "generation steps": m["generation_steps"],
             "tokens/s, median (min-max)": format_spread(m["generation_tokens_per_second"])}
            for name, m in (("Transformer", b), (f"CALM K={r['K']}", c))]
    rep.table(rows)
    rep.text(f"Ratios CALM/Transformer: {_ratios_line(r['ratios'])}. Pearson(BrierLM, CE) over baseline checkpoints: "
             f"{r['correlation_brierlm_vs_ce_baseline']:.3f}.")
    rep.image(line_plot({"Transformer": ([p["train_flops"] for p in b["curve"]], [p["brierlm"] for p in b["curve"]]),
                         f"CALM (K={r['K']})": ([p["train_flops"] for p in c["curve"]], [p["brierlm"] for p in c["curve"]])},
                        "training FLOPs", "BrierLM", "BrierLM vs training compute"), "BrierLM vs FLOPs")
    rep.pre(c["sample_T0.5"])
    rep.write(out / "report.html")


def print_table(r: dict[str, Any]) -> None:
    b, c = r["baseline"], r["calm"]
    print(f"{'':14}{'BrierLM':>9}{'train FLOPs':>13}{'inf FLOPs/tok':>15}{'gen steps':>10}{'tok/s (min-max)':>22}")
    for name, m in (("Transformer", b), (f"CALM K={r['K']}", c)):
        print(f"{name:14}{m['brierlm']:9.2f}{m['train_flops']:13.3g}{m['inference_flops_per_token']:15.3g}"
              f"{m['generation_steps']:10d}{format_spread(m['generation_tokens_per_second']):>22}")
    print(f"ratios: {_ratios_line(r['ratios'])} (generation speed: median (min-max) of {r['repeats']} runs each)")
    print(f"Pearson(BrierLM, cross-entropy) over {len(b['curve'])} baseline checkpoints: {r['correlation_brierlm_vs_ce_baseline']:.3f}")


def _ratios_line(ratios: dict[str, Any]) -> str:
    return ", ".join(f"{k} {format_spread(v, 2) if isinstance(v, dict) else f'{v:.3g}'}" for k, v in ratios.items())


def check_ae(ae_dir: str | Path) -> None:
    if not (Path(ae_dir) / "config.json").is_file():
        raise CelerisError(f"no autoencoder in {ae_dir}; train one with `celeris calm train-ae`")
