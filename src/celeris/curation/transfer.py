"""Transfer learning: LoRA fine-tuning of the default pretrained model vs training from scratch.

Both runs go through `celeris.trainer.Trainer`, share the tokenizer (the pretrained model's, so the
losses are comparable), the validation blocks and the training-FLOPs budget (the LoRA run's
`budget` is spent by the scratch model on many more, cheaper tokens). Compute follows
`celeris.compute.training_flops_per_token`: frozen weights cost forward (2N) plus the backward pass
through activations (2N) but no weight gradients, so LoRA is ≈ 4·N·D, full training 6·N·D.
`lora_model` wraps the model with `peft` (low-rank adapters on the attention projections).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from celeris.compute import training_flops_per_token
from celeris.corpora import Document
from celeris.errors import CelerisError
from celeris.trainer import TrainConfig, Trainer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# SmolLM2 was pretrained on about 2T tokens (model card); the sunk cost a fine-tune amortises.
PRETRAINING_TOKENS = 2e12


def flops_to_reach(history: list[dict[str, Any]], target: float) -> float | None:
    """FLOPs of the first validation at or below `target` (None if never reached)."""
    for h in history:
        if h["val_loss"] <= target:
            return float(h["flops"])
    return None


def lora_model(model: torch.nn.Module, r: int = 8, alpha: int = 16, targets: tuple[str, ...] = LORA_TARGETS):
    """`model` with LoRA adapters (rank `r`) on `targets`; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise CelerisError(f"LoRA rank must be >= 1, got {r}")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                            bias="none"))


def _run(name: str, net, train: torch.Tensor, val: torch.Tensor, out: Path, cfg: TrainConfig, seq_len: int) -> dict[str, Any]:
    fpt = training_flops_per_token(net, seq_len)
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(net, train, val, out, cfg, flops_per_token=fpt, export_fn=None)
    start = {"step": 0, "tokens": 0, "flops": 0.0, "val_loss": trainer.evaluate()}
    t0 = time.perf_counter()
    res = trainer.train(resume=False).raise_if_interrupted()
    shutil.rmtree(out, ignore_errors=True)  # checkpoints of a 135M model are large; the numbers are what we keep
    return {"name": name, "n_params": fpt.n_params, "n_trainable": fpt.n_trainable, "flops_per_token": fpt.to_dict(),
            "steps": res.steps, "tokens": res.tokens, "flops": res.flops, "best_val_loss": res.best_val_loss,
            "final_val_loss": res.final_val_loss, "stop_reason": res.stop_reason, "seconds": time.perf_counter() - t0,
            "history": [start] + [{k: h[k] for k in ("step", "tokens", "flops", "val_loss")} for h in res.history]}


def transfer_vs_scratch(train_docs: list[Document], val_docs: list[Document], work_dir: str | Path,
                        steps: int = 24, eval_every: int = 4, seq_len: int = 64, lora_batch: int = 4,
                        scratch_batch: int = 16, scratch_size: str = "tiny", eval_blocks: int = 16, lr_lora: float = 1e-3,
                        lr_scratch: float = 2e-3, scratch_budget_multiple: float = 4.0, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """LoRA on the default model for `steps` steps, then a `scratch_size` Llama with
    `scratch_budget_multiple` times its FLOPs (scratch is given more, to see how far it gets).

    Returns both curves and the FLOPs each needs to reach the target loss: the scratch run's best
    validation loss (a loss both runs reach, if transfer reaches it at all).
    """
    from celeris.lm import token_blocks
    from celeris.models import load_model, new_model

    work = Path(work_dir)
    base, tok = load_model()
    texts = [d.text for d in train_docs]
    val = token_blocks([d.text for d in val_docs], tok, seq_len, eval_blocks * seq_len)
    if len(val) == 0:
        raise CelerisError("the validation text is shorter than one block")
    # LoRA: only `steps` batches are ever drawn, so tokenize just those (plus slack).
    lora_train = token_blocks(texts, tok, seq_len, (steps + 2) * lora_batch * seq_len)
    net = lora_model(base)
    net.train()
    lcfg = TrainConfig(max_steps=steps, batch_size=lora_batch, lr=lr_lora, warmup_steps=max(1, steps // 8),
                       eval_every=eval_every, eval_batches=max(1, len(val) // lora_batch), seed=seed,
                       progress=progress, save_every=10**9, weight_decay=0.0, desc="transfer:lora")
    lora = _run("lora", net, lora_train, val, work / "lora", lcfg, seq_len)
    budget = lora["flops"] * scratch_budget_multiple
    del net, base
    scratch_net = new_model(scratch_size, vocab_size=len(tok), max_position_embeddings=256, seed=seed)
    scratch_net.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fpt = training_flops_per_token(scratch_net, seq_len)
    s_steps = max(1, int(budget / (fpt.total * scratch_batch * seq_len)))
    scratch_train = token_blocks(texts, tok, seq_len, (s_steps + 2) * scratch_batch * seq_len)
    scfg = TrainConfig(max_steps=s_steps, batch_size=scratch_batch, lr=lr_scratch, warmup_steps=max(1, s_steps // 10),
                       eval_every=max(1, s_steps // 8), eval_batches=max(1, len(val) // scratch_batch), max_flops=budget,
                       seed=seed, progress=progress, save_every=10**9, desc="transfer:scratch")
    scratch = _run("scratch", scratch_net, scratch_train, val, work / "scratch", scfg, seq_len)
    target = scratch["best_val_loss"]

    f_lora, f_scratch = flops_to_reach(lora["history"], target), flops_to_reach(scratch["history"], target)
    pretrain = 6.0 * lora["n_params"] * PRETRAINING_TOKENS
    return {
        "model": "SmolLM2-135M-Instruct + LoRA r=8 on " + ",".join(LORA_TARGETS), "seq_len": seq_len,
        "lora": lora, "scratch": scratch, "target_loss": target, "scratch_budget_multiple": scratch_budget_multiple,
        "lora_zero_shot_loss": lora["history"][0]["val_loss"],
        "lora_flops_to_target": f_lora, "scratch_flops_to_target": f_scratch,
        "factor": (f_scratch / f_lora) if f_lora and f_scratch else (float("inf") if f_lora == 0.0 and f_scratch else None),
        "lora_flops_per_token_over_4N": lora["flops_per_token"]["dense"] / (4 * lora["n_params"]),
        "pretraining_flops_estimate": pretrain,
        "note": "factor counts fine-tuning FLOPs only; the pretrained model's own cost (≈6·N·2T tokens) is "
                "sunk and reported as pretraining_flops_estimate",
    }
