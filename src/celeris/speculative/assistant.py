"""A small same-tokenizer draft model for Hugging Face assisted generation, distilled by Celeris.

`hf-assisted` in `celeris bench speculative` needs a causal LM that shares the target's tokenizer.
None ships offline for SmolLM2, so Celeris makes one from the same local-distillation data the
ReDrafter head learns from (the target's own greedy answers to the training prompts):

- a Llama of the target's vocabulary, narrow and shallow (default 4 layers of width 256);
- its tied embedding starts from the target's own, projected on their top principal directions
  (so it begins with the target's notion of which tokens are alike);
- it is trained with `celeris.trainer.Trainer` on `prompt + answer` sequences, loss on the answer
  tokens only (the target's choices), and saved with `save_pretrained` plus the target's tokenizer,
  so `load_model(DIR)` and `model.generate(assistant_model=...)` take it as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from celeris.errors import CelerisError


def assistant_sequences(data: dict[str, torch.Tensor], pad_id: int, max_len: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (−100 on prompt and padding) and `attention_mask` `[N, T]`.

    `data` is a distillation set: prompt ids `p` (left-padded with −100) and answers `y` (−100 after the end).
    Sequences longer than `max_len` keep their last `max_len` tokens.
    """
    seqs, labs = [], []
    for p, y in zip(data["p"], data["y"], strict=True):
        p, y = p[p >= 0], y[y >= 0]
        if y.numel() == 0:
            continue
        ids = torch.cat([p, y])[-max_len:]
        lab = torch.cat([torch.full_like(p, -100), y])[-max_len:]
        seqs.append(ids)
        labs.append(lab)
    if not seqs:
        raise CelerisError("the distillation data holds no answers to train an assistant on")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, lab, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def new_assistant(target, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4, seed: int = 0):
    """A small Llama with the target's vocabulary and special tokens; embeddings from the target's PCA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tcfg = target.config
    emb = target.get_input_embeddings().weight.detach().float()
    V, H = emb.shape
    if hidden_size > H:
        raise CelerisError(f"the assistant's width ({hidden_size}) must not exceed the target's ({H})")
    if hidden_size % num_heads:
        raise CelerisError(f"the assistant's width ({hidden_size}) must be divisible by its heads ({num_heads})")
    config = LlamaConfig(
        vocab_size=V, hidden_size=hidden_size, intermediate_size=3 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=getattr(tcfg, "max_position_embeddings", 2048), tie_word_embeddings=True,
        rms_norm_eps=getattr(tcfg, "rms_norm_eps", 1e-5), rope_theta=getattr(tcfg, "rope_theta", 10000.0),
        bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    centred = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(centred, q=hidden_size, center=False, niter=4)
    proj = centred @ v[:, :hidden_size]
    proj = proj / proj.std() * config.initializer_range * 4  # a unit-ish scale the small model can train from
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(proj)
    # a weak drafter should propose a few tokens and grow the number while they are accepted
    model.generation_config.num_assistant_tokens = 5
    model.generation_config.num_assistant_tokens_schedule = "heuristic"
    return model


def _answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[n, V]` and labels `[n]` at the answer positions only (the output layer is the costly
    part of a small model with a 49k vocabulary, so it runs only where there is a label)."""
    T = int(batch["attention_mask"].sum(1).max())  # sequences are right-padded: drop the all-padding tail
    h = model.get_decoder()(input_ids=batch["input_ids"][:, :T], attention_mask=batch["attention_mask"][:, :T]).last_hidden_state
    labels = batch["labels"][:, 1:T]
    sel = labels >= 0
    return model.get_output_embeddings()(h[:, :-1][sel]), labels[sel]


def _masked_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch.nn.functional as F

    logits, labels = _answer_logits(model, batch)
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def top1_agreement(model, data: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """Fraction of answer tokens where the assistant's argmax is the target's greedy choice."""
    was = model.training
    model.eval()
    hit = total = 0
    for b0 in range(0, len(data["input_ids"]), batch_size):
        logits, labels = _answer_logits(model, {k: v[b0 : b0 + batch_size] for k, v in data.items()})
        hit += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    model.train(was)
    return hit / max(total, 1)


def train_assistant(out_dir: str | Path, distilled: str | Path | None = None, model=None, tokenizer=None,
                    model_name: str | None = None, hidden_size: int = 256, num_layers: int = 4, max_new_tokens: int = 128,
                    max_prompts: int | None = None, gen_batch_size: int = 16, config=None, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Distil the target's answers into a small same-tokenizer LM; the model lands in `out_dir/model`.

    `distilled` is a directory whose `data/` holds distillation shards (e.g. a `celeris drafter train`
    run); they are generated there if missing. The run resumes like any `Trainer` run.
    """
    from celeris.compute import training_flops_per_token
    from celeris.io import atomic_dir, write_json
    from celeris.models import load_model
    from celeris.speculative.train import distillation_data
    from celeris.trainer import TrainConfig, Trainer

    if distilled is not None and not (Path(distilled) / "data" / "meta.json").is_file():
        raise CelerisError(f"no distillation data in {distilled} (expected {Path(distilled) / 'data' / 'meta.json'}); "
                           "run `celeris drafter train --out DIR` first or leave out --distilled")
    if model is None:
        model, tokenizer = load_model(model_name)
    out_dir = Path(out_dir)
    train, val = distillation_data(model, tokenizer, Path(distilled or out_dir), max_new_tokens, max_prompts,
                                   gen_batch_size, seed, progress, require_existing=distilled is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_s, val_s = assistant_sequences(train, pad), assistant_sequences(val, pad)
    assistant = new_assistant(model, hidden_size, num_layers, seed=seed)
    cfg = config or TrainConfig(max_steps=1500, batch_size=16, lr=3e-3, warmup_steps=100, weight_decay=0.1,
                                eval_every=100, eval_batches=4, patience=4, seed=seed, desc="assistant")
    n_tokens = lambda b: int(b["attention_mask"].sum())  # noqa: E731
    trainer = Trainer(assistant, train_s, val_s, out_dir / "run", cfg, loss_fn=_masked_lm_loss,
                      flops_per_token=training_flops_per_token(assistant, train_s["input_ids"].shape[1]),
                      tokens_fn=n_tokens, export_fn=None,
                      run_info={"kind": "hf-assisted draft model", "distilled": str(distilled or out_dir)})
    result = trainer.train(resume=True)
    best = out_dir / "run" / "best.safetensors"
    if best.is_file():
        from safetensors.torch import load_model as st_load_model

        st_load_model(assistant, str(best))
    agreement = top1_agreement(assistant, val_s)
    with atomic_dir(out_dir / "model") as tmp:
        assistant.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    summary = {"train": result.to_dict(), "validation_top1_agreement": agreement,
               "parameters": sum(p.numel() for p in assistant.parameters()), "train_sequences": len(train_s["input_ids"])}
    write_json(out_dir / "summary.json", summary)
    if not math.isfinite(result.best_val_loss or 0.0):
        raise CelerisError("assistant training diverged")
    return summary
