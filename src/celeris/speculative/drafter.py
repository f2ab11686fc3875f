"""The ReDrafter draft head: a small RNN over the target's own token embeddings, read out by a
residual MLP and a (reduced) vocabulary projection. arXiv 2403.09919 §3.1.

    s_0 = 0
    s_k = silu(W·e(y_k) + U·s_{k-1} + b)          e = the target's frozen input embedding
    g_k = [h, s_k]                                  h = the target's last hidden state, after the final norm
    p(y_{k+1} | ...) = softmax(head(ResBlocks(input_proj(g_k))))

`h` is the hidden state that produced the guaranteed token y_1 (= g₀ in the paper), so one call of
the target gives the drafter everything it needs to draft L−1 further tokens by beam search.

Differences from the reference code, chosen for a ~100M target on a CPU (spec §9 "pitfalls"):
`exit_dim = H` with an `input_proj` (2H→H) instead of 2H, and a reduced draft vocabulary (the most
frequent target tokens of the distillation data, as in EAGLE-3's `d2t` map) instead of the full one.
The projection costs W·H·V per drafted position, which dominates drafting at V = 49k.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from celeris.errors import CelerisError
from celeris.io import atomic_dir, load_tensors, read_json, save_tensors, state_dict_differences, write_json
from celeris.validate import check_schema

FORMAT = "celeris-recurrent-drafter/1"


def _digest(sample: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    rounded = sample.to(dtype).view(torch.int16)  # the bit patterns: no arithmetic, no platform drift
    return hashlib.sha256(rounded.numpy().tobytes() + str(shape).encode()).hexdigest()[:16]


def target_signature(model) -> dict[str, Any]:
    """What a drafter must match: architecture, vocab and hidden size, and a fingerprint of the output layer.

    The fingerprint hashes a strided sample of the output-layer weights rounded to fp16, and again
    rounded to bf16, so two checkpoints of the same architecture but different weights are told
    apart cheaply, while the same weights loaded in float32, float16 or bfloat16 still match (a
    bf16 copy of fp32 weights is their bf16 rounding; an fp16 copy is their fp16 rounding). A drafter
    trained on an fp16 or bf16 copy matches that copy and fp32 upcasts of it, but not the other half
    format (rounding twice can differ from rounding once): train on the fp32 weights to cover all three.
    """
    w = model.get_output_embeddings().weight.detach()
    sample = w.flatten()[:: max(1, w.numel() // 65536)][:65536].to("cpu")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return {"architecture": arch, "vocab_size": int(w.shape[0]), "hidden_size": int(w.shape[1]),
            "output_layer_fingerprint": _digest(sample, tuple(w.shape), torch.float16),
            "output_layer_fingerprint_bf16": _digest(sample, tuple(w.shape), torch.bfloat16)}


def signature_mismatch(want: dict[str, Any], sig: dict[str, Any]) -> list[str]:
    """How a saved target signature differs from a model's (`[]`: it is the same model)."""
    diffs = [f"{k} {want.get(k)!r} vs this model's {sig[k]!r}" for k in ("architecture", "vocab_size", "hidden_size")
             if want.get(k) != sig[k]]
    same = any(want.get(k) is not None and want.get(k) == sig[k]
               for k in ("output_layer_fingerprint", "output_layer_fingerprint_bf16"))
    if not same:
        k = "output_layer_fingerprint"
        diffs.append(f"{k} {want.get(k)!r} vs this model's {sig[k]!r}")
    return diffs


@dataclass
class DrafterConfig:
    """Shape of a drafter and the target it was trained for."""

    hidden_size: int  # the target's H (the RNN state has this size too, it lives in embedding space)
    exit_dim: int  # width of the residual MLP
    num_layers: int  # residual blocks
    draft_vocab_size: int  # size of the reduced vocabulary the head predicts
    target: dict[str, Any] = field(default_factory=dict)  # target_signature(...) of the trained-for model
    format: str = FORMAT


class ResBlock(nn.Module):
    """x + silu(Linear(x)), as in Medusa/ReDrafter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class RecurrentDrafter(nn.Module):
    """ReDrafter head. Tensors: h `[..., H]`, state `[..., H]`, logits `[..., draft_vocab]`.

    `draft_to_target[j]` is the target id of draft token j. The target's input embedding is held as a
    frozen, non-persistent buffer (never saved: it belongs to the target).
    """

    def __init__(self, config: DrafterConfig, embedding: torch.Tensor, draft_to_target: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        H, D = config.hidden_size, config.exit_dim
        if embedding.shape[1] != H:
            raise CelerisError(f"the target's embeddings have width {embedding.shape[1]}, the drafter expects {H}")
        self.register_buffer("embedding", embedding.detach(), persistent=False)
        self.register_buffer("draft_to_target", draft_to_target.long().clone())
        self.rnn_w = nn.Linear(H, H, bias=False)
        self.rnn_u = nn.Linear(H, H, bias=True)
        self.input_proj = nn.Linear(2 * H, D)
        self.blocks = nn.ModuleList(ResBlock(D) for _ in range(config.num_layers))
        self.lm_head = nn.Linear(D, config.draft_vocab_size, bias=False)
        # target id -> draft id (−1 when outside the draft vocabulary); used by training labels
        t2d = torch.full((int(config.target.get("vocab_size", embedding.shape[0])),), -1, dtype=torch.long)
        t2d[self.draft_to_target] = torch.arange(config.draft_vocab_size)
        self.register_buffer("target_to_draft", t2d, persistent=False)

    # ---- the recurrence and the head -----------------------------------------------------------
    def rnn_step(self, state: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Next state `[..., H]` after the target-vocabulary `tokens` `[...]`; `state=None` is s₀ = 0."""
        x = self.rnn_w(F.embedding(tokens, self.embedding))
        return F.silu(x + (self.rnn_u(state) if state is not None else self.rnn_u.bias))

    def forward(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits `[..., Vd]` from h `[..., H]` and state `[..., H]`."""
        x = self.input_proj(torch.cat([h, state], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)

    # ---- save / load ---------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write `drafter.json` + `drafter.safetensors` (fp16 weights) atomically to `directory`."""
        directory = Path(directory)
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        with atomic_dir(directory) as tmp:
            save_tensors(tmp / "drafter.safetensors", tensors)
            write_json(tmp / "drafter.json", {**asdict(self.config), **(extra or {})})
        return directory

    def num_parameters(self) -> int:
        """Weights and biases, float or packed (`engine_decoding.pack_drafter`)."""
        packed = sum(m.q.numel() + (0 if m.bias is None else m.bias.numel())
                     for m in self.modules() if type(m).__name__ == "Int8Linear")
        return sum(p.numel() for p in self.parameters()) + packed


def new_drafter(model, draft_to_target: torch.Tensor, exit_dim: int | None = None, num_layers: int = 1,
                seed: int = 0) -> RecurrentDrafter:
    """A freshly initialised drafter for `model` over the draft vocabulary `draft_to_target` `[Vd]`."""
    sig = target_signature(model)
    emb = model.get_input_embeddings().weight.detach().float()
    ids = draft_to_target.long()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= sig["vocab_size"] or ids.unique().numel() != ids.numel():
        raise CelerisError("the draft vocabulary must be distinct target token ids")
    cfg = DrafterConfig(hidden_size=sig["hidden_size"], exit_dim=exit_dim or sig["hidden_size"], num_layers=num_layers,
                        draft_vocab_size=int(ids.numel()), target=sig)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        drafter = RecurrentDrafter(cfg, emb, ids)
    return drafter.to(next(model.parameters()).device)


def load_drafter(directory: str | Path, model) -> RecurrentDrafter:
    """Load a drafter saved by `RecurrentDrafter.save` onto `model`; refuse one trained for another model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CelerisError(f"drafter directory not found: {directory}")
    meta = read_json(directory / "drafter.json", "drafter config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CelerisError(f"{directory / 'drafter.json'} is not a Celeris recurrent-drafter config (format {FORMAT})")
    check_schema(meta, {"hidden_size": int, "exit_dim": int, "num_layers": int, "draft_vocab_size": int, "target": dict},
                 str(directory / "drafter.json"))
    cfg = DrafterConfig(**{k: meta[k] for k in ("hidden_size", "exit_dim", "num_layers", "draft_vocab_size", "target")})
    diffs = signature_mismatch(cfg.target, target_signature(model))
    if diffs:
        raise CelerisError(f"the drafter in {directory} was trained for another model ({'; '.join(diffs)})")
    emb = model.get_input_embeddings().weight.detach().float()
    if cfg.hidden_size != emb.shape[1]:
        raise CelerisError(f"{directory / 'drafter.json'}: hidden_size {cfg.hidden_size} differs from the target's "
                           f"embedding width {emb.shape[1]}")
    tensors = load_tensors(directory / "drafter.safetensors", "drafter weights")
    d2t = tensors.get("draft_to_target")
    if d2t is None or d2t.ndim != 1 or d2t.is_floating_point() or not len(d2t) or int(d2t.min()) < 0 \
            or int(d2t.max()) >= emb.shape[0]:
        raise CelerisError(f"{directory / 'drafter.safetensors'} has no valid draft vocabulary (draft_to_target: "
                           f"integer ids of the target's {emb.shape[0]} tokens)")
    if cfg.draft_vocab_size != len(d2t):
        raise CelerisError(f"{directory / 'drafter.json'}: draft_vocab_size {cfg.draft_vocab_size} differs from the "
                           f"{len(d2t)} ids of draft_to_target in drafter.safetensors")
    # Shapes checked on the meta device first: an edited config never allocates or half-loads a drafter.
    with torch.device("meta"):
        expected = RecurrentDrafter(cfg, emb.to("meta"), d2t.to("meta")).state_dict()
    diffs = state_dict_differences({k: v.shape for k, v in expected.items()}, tensors)
    if diffs:
        raise CelerisError(f"drafter weights in {directory} do not match drafter.json: {'; '.join(diffs[:4])}"
                           + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""))
    drafter = RecurrentDrafter(cfg, emb, d2t)
    drafter.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    return drafter.to(next(model.parameters()).device).eval()


def drafter_info(directory: str | Path) -> dict[str, Any]:
    """The saved config of a drafter (for reports), without loading weights."""
    return json.loads((Path(directory) / "drafter.json").read_text())
