"""The CALM autoencoder: K tokens ↔ one latent vector, context-free, MLP only (no attention).

Encoder: embed each of the K tokens → one `AELayer` per token → concat (K·d) → `squeeze` Linear(K·d→d)
→ `AELayer` → RMSNorm → Linear(d→2l) = (μ, log σ). Decoder: Linear(l→d) → `AELayer` → `expand`
Linear(d→K·d) → one `AELayer` per token → RMSNorm → logits = h·Eᵀ (E is the encoder's embedding).

Robustness regularisation (training only), so the LM's slightly-off predictions still decode right:
token dropout (inputs replaced by a dedicated mask id, labels stay clean), latent dropout on z, and a
per-dimension KL clipped from below at `kl_clamp` nats (no push towards the prior below it, which
prevents posterior collapse). Loss = K·CE_mean + kl_weight·Σᵢ max(KLᵢ, kl_clamp).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from celeris.errors import CelerisError
from celeris.io import load_tensors, read_json, save_tensors, write_json


@dataclass
class AutoencoderConfig:
    vocab_size: int
    patch_size: int = 4  # K tokens per latent
    hidden_size: int = 128
    intermediate_size: int = 320
    latent_size: int = 32  # l
    token_dropout: float = 0.15
    latent_dropout: float = 0.15
    kl_clamp: float = 0.5
    kl_weight: float = 1e-3

    @property
    def mask_id(self) -> int:
        """The dedicated mask id for token dropout: one extra embedding row past the vocabulary."""
        return self.vocab_size


class SwiGLU(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class AELayer(nn.Module):
    """Pre-RMSNorm residual SwiGLU block (the Llama MLP, without attention)."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.RMSNorm(d, eps=1e-6), SwiGLU(d, ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Autoencoder(nn.Module):
    """Variational autoencoder over chunks of K tokens; `encode` `[..., K] → (μ, log σ) [..., l]`."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        c = self.config = config
        d, K = c.hidden_size, c.patch_size
        self.embed = nn.Embedding(c.vocab_size + 1, d)  # + the mask id
        self.enc_token, self.squeeze = AELayer(d, c.intermediate_size), nn.Linear(K * d, d)
        self.enc_chunk, self.enc_norm = AELayer(d, c.intermediate_size), nn.RMSNorm(d, eps=1e-6)
        self.to_latent = nn.Linear(d, 2 * c.latent_size)
        self.from_latent, self.dec_chunk = nn.Linear(c.latent_size, d), AELayer(d, c.intermediate_size)
        self.expand, self.dec_token = nn.Linear(d, K * d), AELayer(d, c.intermediate_size)
        self.dec_norm = nn.RMSNorm(d, eps=1e-6)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens `[..., K]` → (μ, log σ), each `[..., l]`."""
        h = self.enc_token(self.embed(tokens))  # [..., K, d]
        h = self.squeeze(h.flatten(-2))
        h = self.enc_norm(self.enc_chunk(h))
        mu, log_sigma = self.to_latent(h).chunk(2, dim=-1)
        return mu, log_sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z `[..., l]` → logits `[..., K, V]` (the mask id is never predicted)."""
        h = self.dec_chunk(self.from_latent(z))
        h = self.expand(h).unflatten(-1, (self.config.patch_size, self.config.hidden_size))
        h = self.dec_norm(self.dec_token(h))
        return h @ self.embed.weight[: self.config.vocab_size].T

    @torch.no_grad()
    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Argmax decoding: z `[..., l]` → tokens `[..., K]`."""
        return self.decode(z).argmax(-1)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """K·CE_mean + kl_weight·Σᵢ max(KLᵢ, kl_clamp) on chunks `[B, K]` (regularised only in training)."""
        c = self.config
        inputs = tokens
        if self.training and c.token_dropout > 0:
            drop = torch.rand(tokens.shape, device=tokens.device) < c.token_dropout
            inputs = tokens.masked_fill(drop, c.mask_id)
        mu, log_sigma = self.encode(inputs)
        z = mu + log_sigma.exp() * torch.randn_like(mu) if self.training else mu
        z = F.dropout(z, c.latent_dropout, self.training)
        logits = self.decode(z)
        ce = F.cross_entropy(logits.flatten(0, -2), tokens.flatten())
        kl = 0.5 * (mu.pow(2) + (2 * log_sigma).exp() - 1 - 2 * log_sigma)
        kl = kl.clamp_min(c.kl_clamp).sum(-1).mean()
        return c.patch_size * ce + c.kl_weight * kl

    # ---- persistence: config.json + model.safetensors --------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "config.json", {"celeris_type": "calm-autoencoder", **asdict(self.config)})
        save_tensors(d / "model.safetensors", self.state_dict())

    @classmethod
    def load(cls, directory: str | Path) -> Autoencoder:
        d = Path(directory)
        cfg = read_json(d / "config.json", "autoencoder config")
        if cfg.pop("celeris_type", None) != "calm-autoencoder":
            raise CelerisError(f"{d} does not hold a CALM autoencoder (config.json has no celeris_type 'calm-autoencoder')")
        ae = cls(AutoencoderConfig(**cfg))
        try:
            ae.load_state_dict(load_tensors(d / "model.safetensors", "autoencoder weights"))
        except RuntimeError as exc:
            raise CelerisError(f"autoencoder weights in {d} do not match its config: {str(exc).splitlines()[0]}") from None
        return ae.float().eval()


def chunk_tokens(ids: torch.Tensor, K: int) -> torch.Tensor:
    """Token blocks `[n, T]` (T a multiple of K) → chunks `[n·T/K, K]`."""
    if ids.shape[-1] % K:
        raise CelerisError(f"the block length {ids.shape[-1]} is not a multiple of K = {K}")
    return ids.reshape(-1, K)


@torch.no_grad()
def token_accuracy(ae: Autoencoder, chunks: torch.Tensor, noise: float = 0.0, seed: int = 0, batch: int = 4096) -> float:
    """Fraction of tokens reconstructed exactly from μ (+ N(0, noise²) per dimension), chunks `[n, K]`."""
    g = torch.Generator().manual_seed(seed)
    ae.eval()
    right = 0
    for i in range(0, len(chunks), batch):
        x = chunks[i : i + batch]
        mu, _ = ae.encode(x)
        if noise > 0:
            mu = mu + noise * torch.randn(mu.shape, generator=g)
        right += int((ae.decode_tokens(mu) == x).sum())
    return right / chunks.numel()
