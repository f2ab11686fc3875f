"""Compute accounting: training and inference FLOPs by the Kaplan convention.

Training on D tokens costs C ≈ 6·N·D (2ND forward + 4ND backward), with N the parameters excluding
embedding tables (Hugging Face's `total_flos` convention; an untied output layer counts, it is a real
matmul). Frozen weights get no weight gradient, so in general C = (4·N + 2·N_trainable)·D, which is
6ND for full training and ≈ 4ND for LoRA. The attention-score term, 6·n_layer·n_ctx·d_attn per
token for training (2·… for inference), is reported separately, never folded into 6ND.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def _embedding_param_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = True, trainable_only: bool = False) -> int:
    """Parameters of `model` (each shared tensor once), without embedding tables by default."""
    skip = _embedding_param_ids(model) if exclude_embeddings else set()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per processed token. `dense` is the 6N-style term, `attention` the score/value term."""

    n_params: int
    n_trainable: int
    dense: float
    attention: float

    @property
    def total(self) -> float:
        return self.dense + self.attention

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> FlopsPerToken:
    """Training FLOPs per token for a causal LM trained on sequences of `seq_len` tokens."""
    n = count_parameters(model)
    n_train = count_parameters(model, trainable_only=True)
    dense = 4.0 * n + 2.0 * n_train
    return FlopsPerToken(n, n_train, dense, 3.0 * attention_flops_per_token(model, seq_len))


def inference_flops_per_token(model: torch.nn.Module, context: int) -> FlopsPerToken:
    """Forward-only FLOPs per token (2N plus the attention term at the given context length)."""
    n = count_parameters(model)
    return FlopsPerToken(n, 0, 2.0 * n, attention_flops_per_token(model, context))


def attention_flops_per_token(model: torch.nn.Module, context: int) -> float:
    """Forward attention FLOPs per token, Kaplan's 2·n_layer·n_ctx·d_attn."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        return 0.0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = head_dim * cfg.num_attention_heads
    return 2.0 * cfg.num_hidden_layers * context * d_attn
