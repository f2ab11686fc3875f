"""CALM: a continuous autoregressive LM that predicts the next K-token latent with an energy head.

    tokens of chunk t ──LM embedding──> [K·d] ──embed_proj──> x_t ──Llama backbone──> h_t
    h_t + noise ε ~ U[−½, ½]^64 ──EnergyHead──> one sample of z_{t+1}   (frozen AE decodes it to K tokens)

Training uses the energy score (strictly proper for α ∈ (0, 2); α = 1): with N head samples xₙ and M
posterior samples yₘ = μ + σ·εₘ from the frozen AE encoder on the clean target chunk,

    L = (2/(N·M)) Σₙ Σₘ ‖xₙ − yₘ‖^α − (1/(N(N−1))) Σ_{n≠k} ‖xₙ − x_k‖^α,

averaged over positions. No likelihood is needed anywhere; quality is measured with BrierLM
(`celeris.metrics`) and temperature is applied by likelihood-free rejection (`celeris.calm.sampling`).
The backbone is an unmodified Hugging Face `LlamaModel`, fed through `inputs_embeds`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from celeris.calm.autoencoder import Autoencoder
from celeris.errors import CelerisError
from celeris.io import load_tensors, read_json, save_tensors, write_json


@dataclass
class CALMConfig:
    vocab_size: int
    patch_size: int = 4  # K
    latent_size: int = 32  # l (must equal the AE's)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 1024  # in chunks
    noise_size: int = 64
    num_mlp_layers: int = 1  # energy-head blocks (backbone layers / 4 in the paper)
    head_hidden_size: int | None = None  # default: hidden_size
    num_samples: int = 8  # N
    num_target_samples: int = 100  # M
    beta: float = 1.0  # α, the energy-score exponent
    eos_token_id: int | None = None

    @property
    def head_size(self) -> int:
        return self.head_hidden_size or self.hidden_size


# ---------------------------------------------------------------------------------------------------
# Energy head and energy loss
# ---------------------------------------------------------------------------------------------------
class HeadBlock(nn.Module):
    """e ← e + W_down(SiLU(gate) ⊙ up), with (gate, up) = MLP([LN(e), c])."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down = nn.Linear(d, d)

    def forward(self, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate, up = self.mlp(torch.cat([self.norm(e), c], -1)).chunk(2, -1)
        return e + self.down(F.silu(gate) * up)


class EnergyHead(nn.Module):
    """One-step generator: (h `[..., d]`, ε `[..., noise]`) → one latent sample `[..., l]`."""

    def __init__(self, hidden_size: int, latent_size: int, noise_size: int = 64, num_blocks: int = 1,
                 head_size: int | None = None) -> None:
        super().__init__()
        d = head_size or hidden_size
        self.noise_size = noise_size
        self.embed_noise = nn.Sequential(nn.Linear(noise_size, d), nn.LayerNorm(d))
        self.embed_hidden = nn.Sequential(nn.Linear(hidden_size, d), nn.LayerNorm(d))
        self.blocks = nn.ModuleList(HeadBlock(d) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, latent_size))
        nn.init.zeros_(self.out[-1].weight)  # zero-initialised output: every sample starts at 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, h: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """h `[..., d]` → samples `[num_samples, ..., l]` (the context embedding is computed once)."""
        c = self.embed_hidden(h).expand(num_samples, *h.shape[:-1], -1)
        eps = torch.rand(num_samples, *h.shape[:-1], self.noise_size, generator=generator, device=h.device) - 0.5
        e = self.embed_noise(eps)
        for block in self.blocks:
            e = block(e, c)
        return self.out(e)


def energy_loss(x: torch.Tensor, y: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The energy-score loss, averaged over positions.

    x: model samples `[N, P, l]` (N ≥ 2); y: target samples `[M, P, l]`.
    Returns 2·mean_{n,m}‖xₙ − yₘ‖^β − mean_{n≠k}‖xₙ − x_k‖^β, then the mean over the P positions.
    """
    N = x.shape[0]
    if N < 2:
        raise CelerisError("the energy loss needs at least 2 model samples per position")
    xp, yp = x.transpose(0, 1), y.transpose(0, 1)  # [P, N, l], [P, M, l]
    fit = torch.cdist(xp, yp).pow(beta).mean((1, 2))  # [P]
    # cdist's gradient at a zero distance (the diagonal) is NaN-free but the diagonal must not count.
    pair = torch.cdist(xp, xp)
    off = ~torch.eye(N, dtype=torch.bool, device=x.device)
    spread = pair[:, off].clamp_min(1e-12).pow(beta).mean(1)  # [P]
    return (2 * fit - spread).mean()


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class CALM(nn.Module):
    """Llama backbone over chunk embeddings + `EnergyHead`, with a frozen `Autoencoder` for targets/decoding.

    `forward`/`loss` take token blocks `[B, T]` with T a multiple of K; chunk t predicts chunk t+1.
    """

    is_likelihood_free = True

    def __init__(self, config: CALMConfig, autoencoder: Autoencoder) -> None:
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        check_compatible(config, autoencoder)
        self.config = c = config
        d, K = c.hidden_size, c.patch_size
        self.embed_tokens = nn.Embedding(c.vocab_size, d)  # the LM's own embedding, not the AE's
        self.embed_proj = nn.Sequential(nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d))
        llama = LlamaConfig(vocab_size=1, hidden_size=d, num_hidden_layers=c.num_hidden_layers,
                            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                            intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                            rms_norm_eps=1e-5, attn_implementation="sdpa")
        self.backbone = LlamaModel(llama)
        self.backbone.embed_tokens = None  # inputs come through `inputs_embeds` only
        self.head = EnergyHead(d, c.latent_size, c.noise_size, c.num_mlp_layers, c.head_hidden_size)
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never dropout, never sampling-noise changes
        return self

    def chunk_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[B, L, K]` → backbone inputs `[B, L, d]` (re-embedded, concatenated, compressed)."""
        return self.embed_proj(self.embed_tokens(tokens).flatten(-2))

    def hidden_states(self, tokens: torch.Tensor, past_key_values=None, start: int = 0):
        """tokens `[B, L, K]` → (h `[B, L, d]`, cache); chunk positions start at `start`."""
        x = self.chunk_embeddings(tokens)
        pos = torch.arange(start, start + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        out = self.backbone(inputs_embeds=x, position_ids=pos, past_key_values=past_key_values, use_cache=past_key_values is not None)
        return out.last_hidden_state, out.past_key_values

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Energy loss on token blocks `[B, T]` (teacher forcing: chunks 0…L−2 predict chunks 1…L−1)."""
        c = self.config
        chunks = _chunks(ids, c.patch_size)  # [B, L, K]
        h, _ = self.hidden_states(chunks[:, :-1])
        with torch.no_grad():
            mu, log_sigma = self.autoencoder.encode(chunks[:, 1:])  # clean targets, frozen AE
            eps = torch.randn(c.num_target_samples, *mu.shape, device=mu.device)
            y = mu + log_sigma.exp() * eps  # [M, B, L-1, l]
        x = self.head(h, c.num_samples)  # [N, B, L-1, l]
        return energy_loss(x.flatten(1, 2), y.flatten(1, 2), c.beta)

    @torch.no_grad()
    def brier_samples(self, ids: torch.Tensor, generator: torch.Generator | None = None, batch: int = 16):
        """For BrierLM's two-sample estimator: two decoded head samples and the truth per chunk position.

        ids `[n, T]` → (x1, x2, y), each `[n·(L−1), K]`: teacher-forced context, argmax AE decoding.
        """
        xs1, xs2, ys = [], [], []
        for i in range(0, len(ids), batch):
            chunks = _chunks(ids[i : i + batch], self.config.patch_size)
            h, _ = self.hidden_states(chunks[:, :-1])
            z = self.head(h, 2, generator)
            tok = self.autoencoder.decode_tokens(z)  # [2, B, L-1, K]
            xs1.append(tok[0].flatten(0, 1))
            xs2.append(tok[1].flatten(0, 1))
            ys.append(chunks[:, 1:].flatten(0, 1))
        return torch.cat(xs1), torch.cat(xs2), torch.cat(ys)

    @torch.no_grad()
    def brier_rollout_samples(self, ids: torch.Tensor, n: int = 4, generator: torch.Generator | None = None,
                              batch: int = 64):
        """BrierLM's two-sample estimator for any K, including K < n: two roll-outs per scored position.

        A position is scored every max(1, n // K) chunks (every 4 tokens for K = 1, 2 and 4, every 3 for
        K = 3), with the teacher-forced context before it. Each roll-out samples ⌈n/K⌉ chunks, feeding
        the model its own decoded chunks, so the first n sampled tokens are a draw from the model's
        n-token law there. Returns (x1, x2, y), each `[positions, n]`.
        """
        from transformers import DynamicCache

        K = self.config.patch_size
        R = -(-n // K)  # chunks per roll-out
        chunks = _chunks(ids, K)  # [B, L, K]
        L, stride = chunks.shape[1], max(1, n // K)
        if L < stride + R:
            raise CelerisError(f"token blocks of {ids.shape[-1]} tokens are too short to score {n}-grams with K = {K}")
        xs1, xs2, ys = [], [], []
        for p in range(stride, L - R + 1, stride):  # context chunks[:, :p], truth chunks[:, p:p+R]
            for i in range(0, len(ids), batch):
                ctx = chunks[i : i + batch, :p]
                b = ctx.shape[0]
                h, cache = self.hidden_states(torch.cat([ctx, ctx]), DynamicCache(), 0)  # two independent roll-outs
                h, drawn = h[:, -1:], []
                for r in range(R):
                    tok = self.autoencoder.decode_tokens(self.head(h, 1, generator)[0])  # [2b, 1, K]
                    drawn.append(tok)
                    if r + 1 < R:
                        h, cache = self.hidden_states(tok, cache, p + r)
                x = torch.cat(drawn, 1).flatten(1)[:, :n]
                xs1.append(x[:b])
                xs2.append(x[b:])
                ys.append(chunks[i : i + batch, p : p + R].flatten(1)[:, :n])
        return torch.cat(xs1), torch.cat(xs2), torch.cat(ys)

    # ---- persistence: config.json + model.safetensors, the autoencoder in ae/ ---------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "config.json", {"celeris_type": "calm", **asdict(self.config)})
        save_tensors(d / "model.safetensors", {k: v for k, v in self.state_dict().items() if not k.startswith("autoencoder.")})
        self.autoencoder.save(d / "ae")

    @classmethod
    def load(cls, directory: str | Path, autoencoder: str | Path | Autoencoder | None = None) -> CALM:
        d = Path(directory)
        cfg = read_json(d / "config.json", "CALM config")
        if cfg.pop("celeris_type", None) != "calm":
            raise CelerisError(f"{d} does not hold a CALM model (config.json has no celeris_type 'calm')")
        ae = autoencoder if isinstance(autoencoder, Autoencoder) else Autoencoder.load(autoencoder or d / "ae")
        model = cls(CALMConfig(**cfg), ae)
        state = load_tensors(d / "model.safetensors", "CALM weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("autoencoder.")]
        if missing or unexpected:
            raise CelerisError(f"CALM weights in {d} do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.float().eval()


def check_compatible(config: CALMConfig, ae: Autoencoder) -> None:
    """An AE whose K, vocabulary or latent size differ from the CALM model's cannot be used with it."""
    a = ae.config
    for name, mine, theirs in (("K (patch_size)", config.patch_size, a.patch_size),
                               ("vocabulary size", config.vocab_size, a.vocab_size),
                               ("latent size", config.latent_size, a.latent_size)):
        if mine != theirs:
            raise CelerisError(f"the autoencoder's {name} is {theirs}, but the CALM model's is {mine}")


def _chunks(ids: torch.Tensor, K: int) -> torch.Tensor:
    if ids.shape[-1] % K or ids.shape[-1] < 2 * K:
        raise CelerisError(f"token blocks must be a multiple of K = {K} and hold at least 2 chunks, got {ids.shape[-1]} tokens")
    return ids.unflatten(-1, (-1, K))


def calm_loss(model: CALM, batch: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for `celeris.trainer.Trainer`."""
    return model.loss(batch)


def describe(model: CALM) -> dict[str, Any]:
    from celeris.compute import count_parameters

    return {"backbone": count_parameters(model.backbone), "embed_proj": count_parameters(model.embed_proj),
            "head": count_parameters(model.head), "autoencoder": count_parameters(model.autoencoder, exclude_embeddings=False)}
