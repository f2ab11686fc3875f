"""Recipes: train the autoencoder, then the CALM model on its frozen latents, both on `celeris.trainer`.

Also the FLOPs accounting that counts every part of CALM (Kaplan convention, per token):

* training  = [3·2·(backbone + embed_proj) + head (context embedding once, the rest × N samples, ×3)
               + 2·AE encoder (frozen: forward only)] / K  + 3·attention / K
* inference = [2·(backbone + embed_proj) + 2·head (one sample) + 2·AE decoder incl. its K·d·V output] / K
              + attention / K
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from celeris.calm.autoencoder import Autoencoder, AutoencoderConfig, token_accuracy
from celeris.calm.model import CALM, CALMConfig, calm_loss
from celeris.compute import FlopsPerToken, attention_flops_per_token, count_parameters
from celeris.corpora import Corpus, load_corpus
from celeris.errors import CelerisError
from celeris.io import check_run_dir, run_dir
from celeris.trainer import TrainConfig, Trainer, TrainResult


def _n(*modules: torch.nn.Module) -> int:
    return sum(count_parameters(m, exclude_embeddings=False) for m in modules)


# ---- FLOPs -------------------------------------------------------------------------------------------
def ae_encoder_flops_per_chunk(ae: Autoencoder) -> float:
    K = ae.config.patch_size
    return 2.0 * (K * _n(ae.enc_token) + _n(ae.squeeze, ae.enc_chunk, ae.enc_norm, ae.to_latent))


def ae_decoder_flops_per_chunk(ae: Autoencoder) -> float:
    c = ae.config
    out = c.patch_size * c.hidden_size * c.vocab_size  # logits = h·Eᵀ for each of the K tokens
    return 2.0 * (_n(ae.from_latent, ae.dec_chunk, ae.expand) + c.patch_size * _n(ae.dec_token, ae.dec_norm) + out)


def ae_training_flops_per_token(ae: Autoencoder) -> FlopsPerToken:
    n = _n(ae) - ae.embed.weight.numel()
    dense = 3.0 * (ae_encoder_flops_per_chunk(ae) + ae_decoder_flops_per_chunk(ae)) / ae.config.patch_size
    return FlopsPerToken(n, n, dense, 0.0)


def head_flops_per_position(model: CALM, samples: int) -> float:
    h = model.head
    return 2.0 * (_n(h.embed_hidden) + samples * _n(h.embed_noise, h.blocks, h.out))


def calm_training_flops_per_token(model: CALM, context_chunks: int) -> FlopsPerToken:
    c = model.config
    K = c.patch_size
    lm = 2.0 * _n(model.backbone, model.embed_proj)
    dense = (3.0 * lm + 3.0 * head_flops_per_position(model, c.num_samples) + ae_encoder_flops_per_chunk(model.autoencoder)) / K
    attn = 3.0 * attention_flops_per_token(model.backbone, context_chunks) / K
    n = _n(model.backbone, model.embed_proj, model.head)
    return FlopsPerToken(n, n, dense, attn)


def calm_inference_flops_per_token(model: CALM, context_chunks: int) -> FlopsPerToken:
    K = model.config.patch_size
    dense = (2.0 * _n(model.backbone, model.embed_proj) + head_flops_per_position(model, 1)
             + ae_decoder_flops_per_chunk(model.autoencoder)) / K
    n = _n(model.backbone, model.embed_proj, model.head)
    return FlopsPerToken(n, 0, dense, attention_flops_per_token(model.backbone, context_chunks) / K)


# ---- data --------------------------------------------------------------------------------------------
def build_tokenizer(corpus: Corpus, vocab_size: int = 512):
    """A small byte-level BPE on the training split: low-entropy tokens keep tiny models' BrierLM > 0."""
    from celeris.lm import train_tokenizer

    return train_tokenizer(corpus.split("train").texts(), vocab_size)


def token_data(corpus: Corpus, tokenizer, seq_len: int, max_train_tokens: int | None,
               max_val_tokens: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token blocks `[n, seq_len]` from the corpus's train/validation splits."""
    from celeris.lm import token_blocks

    train = token_blocks(corpus.split("train").texts(), tokenizer, seq_len, max_train_tokens)
    val = token_blocks(corpus.split("validation").texts(), tokenizer, seq_len, max_val_tokens)
    if len(val) == 0:
        raise CelerisError(f"corpus {corpus.name} has too little validation text for blocks of {seq_len} tokens")
    return train, val


# ---- recipes -----------------------------------------------------------------------------------------
def train_ae(out_dir: str | Path, corpus: str | Corpus = "python-stdlib", tokenizer: str | None = None,
             vocab_size: int = 512, ae_config: dict[str, Any] | None = None, config: TrainConfig | None = None,
             max_train_tokens: int | None = 2_000_000, overwrite: bool = False) -> TrainResult:
    """Train the autoencoder on K-token chunks of the corpus; writes `out_dir` (AE + tokenizer)."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    # Every option is checked before the disk is touched: a rejected value never leaves a folder behind,
    # and --overwrite replaces a run only once the new one is known to start.
    config = config or TrainConfig(max_steps=3000, batch_size=256, lr=3e-3, warmup_steps=100, eval_every=250, desc="train AE")
    config.validate()
    check_run_dir(out)
    data = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if not overwrite and (out / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(out)
    elif tokenizer:
        from celeris.models import load_tokenizer

        tok = load_tokenizer(tokenizer)
    else:
        tok = build_tokenizer(data, vocab_size)
    cfg = AutoencoderConfig(vocab_size=len(tok), **(ae_config or {}))
    K = cfg.patch_size
    train, val = token_data(data, tok, 64 * K, max_train_tokens)
    # Stopped before the trainer wrote anything (Ctrl-C, an error): a folder this call created goes away
    # again; an older one keeps its marker and resumes.
    with run_dir(out, overwrite):
        tok.save_pretrained(out)
        torch.manual_seed(config.seed)
        ae = Autoencoder(cfg)
        trainer = Trainer(ae, train.reshape(-1, K), val.reshape(-1, K), out, config, loss_fn=lambda m, b: m.loss(b),
                          flops_per_token=ae_training_flops_per_token(ae), export_fn=lambda m, d: m.save(d),
                          tokenizer=tok, run_info={"corpus": data.name, "ae_config": asdict(cfg)})
        return trainer.train()


def eval_ae(ae: Autoencoder, tokenizer, texts: list[str], noise: float = 0.0, max_tokens: int = 200_000) -> dict[str, float]:
    """Token reconstruction accuracy of `ae` on `texts`, clean or with N(0, noise²) added to μ."""
    from celeris.lm import token_blocks

    K = ae.config.patch_size
    if len(tokenizer) != ae.config.vocab_size:
        raise CelerisError(f"the tokenizer has {len(tokenizer)} tokens but the autoencoder's vocabulary is {ae.config.vocab_size}")
    blocks = token_blocks(texts, tokenizer, K, max_tokens)
    if len(blocks) == 0:
        raise CelerisError(f"the text is shorter than K = {K} tokens")
    return {"token_accuracy": token_accuracy(ae, blocks, noise), "noise": noise, "tokens": int(blocks.numel())}


def train_calm(out_dir: str | Path, ae_dir: str | Path, corpus: str | Corpus = "python-stdlib",
               calm_config: dict[str, Any] | None = None, config: TrainConfig | None = None, seq_len: int = 128,
               max_train_tokens: int | None = 2_000_000, overwrite: bool = False, train_data: torch.Tensor | None = None,
               val_data: torch.Tensor | None = None) -> tuple[TrainResult, CALM]:
    """Train a CALM model on the frozen autoencoder in `ae_dir` (its tokenizer is reused)."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    # Every option is checked before the disk is touched (see `train_ae`).
    config = config or TrainConfig(max_steps=2000, batch_size=16, lr=1e-3, warmup_steps=50, eval_every=200, desc="train CALM")
    config.validate()
    check_run_dir(out)
    ae = Autoencoder.load(ae_dir)
    try:
        tok = AutoTokenizer.from_pretrained(ae_dir)
    except Exception:
        raise CelerisError(f"no tokenizer next to the autoencoder in {ae_dir}") from None
    K = ae.config.patch_size
    if seq_len % K or seq_len < 2 * K:
        raise CelerisError(f"seq_len must be a multiple of K = {K} and at least {2 * K}, got {seq_len}")
    known = {f.name for f in fields(CALMConfig)}
    extra = dict(calm_config or {})
    bad = set(extra) - known
    if bad:
        raise CelerisError(f"unknown CALM settings: {', '.join(sorted(bad))}")
    cfg = CALMConfig(vocab_size=ae.config.vocab_size, patch_size=K, latent_size=ae.config.latent_size,
                     eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(config.seed)
    model = CALM(cfg, ae)
    if train_data is None:
        data = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
        train_data, val_data = token_data(data, tok, seq_len, max_train_tokens)
    with run_dir(out, overwrite):
        trainer = Trainer(model, train_data, val_data, out, config, loss_fn=calm_loss,
                          flops_per_token=calm_training_flops_per_token(model, seq_len // K),
                          export_fn=lambda m, d: m.save(d), tokenizer=tok,
                          run_info={"calm_config": asdict(cfg), "seq_len": seq_len})
        return trainer.train(), model
