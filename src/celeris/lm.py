"""Train a causal LM on a corpus: tokenizer (BPE, when asked), token blocks, and the `train_lm` recipe.

`train_lm` is what `celeris train-lm` runs: a new Llama-architecture model of a named size with a
freshly trained byte-level BPE tokenizer, or a fine-tune of a loaded pretrained model, through the
shared `Trainer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from celeris.compute import training_flops_per_token
from celeris.corpora import Corpus, load_corpus
from celeris.errors import CelerisError
from celeris.io import RUN_MARKER, check_run_dir, run_dir  # noqa: F401  (RUN_MARKER: re-exported)
from celeris.trainer import TrainConfig, Trainer, TrainResult, check_batch_split, process_state

EOS = "<|endoftext|>"


def _sample(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    used = 0
    for t in texts:
        if used >= max_chars:
            return
        t = t[: max_chars - used]
        used += len(t)
        yield t


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, max_chars: int = 4_000_000):
    """Byte-level BPE (the `tokenizers` library) trained on up to `max_chars` characters of `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not 256 < vocab_size <= 1_000_000:
        raise CelerisError(f"vocab_size must be in (256, 1000000], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_sample(texts, max_chars), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def token_blocks(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Concatenate the documents (each followed by EOS) and cut them into blocks `[n, seq_len]`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CelerisError("the tokenizer has no end-of-sequence token")
    parts: list[np.ndarray] = []
    total = 0
    for i in tqdm(range(0, len(texts), 128), desc="tokenize", disable=not progress, unit="batch", leave=False):
        for ids in tokenizer(texts[i : i + 128], add_special_tokens=False)["input_ids"]:
            arr = np.asarray([*ids, eos], dtype=np.int64)
            parts.append(arr)
            total += len(arr)
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        return torch.empty(0, seq_len, dtype=torch.long)
    flat = np.concatenate(parts)
    if max_tokens is not None:
        flat = flat[:max_tokens]
    n = len(flat) // seq_len
    return torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())


def train_lm(
    out_dir: str | Path,
    corpus: str | Corpus = "python-stdlib",
    size: str = "tiny",
    model: str | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    config: TrainConfig | None = None,
    max_train_tokens: int | None = None,
    max_val_tokens: int = 200_000,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a causal LM and save it (safetensors + tokenizer) to `out_dir`; returns the run summary.

    From scratch (`model=None`): a Llama of `size`; the tokenizer is trained (BPE, `vocab_size`)
    unless `tokenizer` names a model whose tokenizer to reuse. Fine-tuning: `model` names a model for
    `celeris.load_model` and its own tokenizer is used. A run interrupted in `out_dir` resumes.
    Under `accelerate launch` the main process prepares `out_dir` and the tokenizer; the others read them.
    """
    from transformers import AutoTokenizer

    from celeris.models import MODEL_SIZES, load_model, load_tokenizer, new_model

    config = config or TrainConfig()
    out = Path(out_dir)
    # Every option is checked before the disk is touched: a rejected value never leaves a folder behind.
    config.validate()
    check_batch_split(config.batch_size)
    if model is None and size not in MODEL_SIZES:
        raise CelerisError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    if seq_len < 8:
        raise CelerisError(f"seq_len must be at least 8, got {seq_len}")
    if model is None and (tokenizer is None or tokenizer == "train") and not 256 < vocab_size <= 1_000_000:
        raise CelerisError(f"vocab_size must be in (256, 1000000], got {vocab_size}")
    check_run_dir(out)
    procs = process_state()
    procs.wait_for_everyone()  # every process has checked `out` before the main one (over)writes it
    data = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    train_docs, val_docs = data.split("train"), data.split("validation")
    if not val_docs.documents:
        raise CelerisError(f"corpus {data.name} is too small to hold out validation documents")
    resumed_tok = not overwrite and (out / "tokenizer.json").is_file() and (out / "checkpoint").exists()
    tok = None
    if model is not None:
        net, tok = load_model(model)
        net.train()
        if seq_len > (getattr(net.config, "max_position_embeddings", None) or seq_len):
            raise CelerisError(f"seq_len {seq_len} exceeds the model's context length {net.config.max_position_embeddings}")
    elif tokenizer not in (None, "train"):
        tok = load_tokenizer(tokenizer)
    # Stopped before the trainer wrote anything (Ctrl-C while the tokenizer trains, an error): a folder
    # this call created goes away again; an older one keeps its marker and resumes.
    with contextlib.ExitStack() as stack:
        with procs.main_process_first():
            stack.enter_context(run_dir(out, overwrite and procs.is_main_process))
            if model is None and tok is None and (resumed_tok or not procs.is_main_process):
                tok = AutoTokenizer.from_pretrained(out)  # the main process's (or the resumed run's) tokenizer
            elif model is None and tok is None:
                tok = train_tokenizer(train_docs.texts(), vocab_size)
            if model is None and procs.is_main_process:
                tok.save_pretrained(out)
        if model is None:
            net = new_model(size, vocab_size=len(tok), max_position_embeddings=max(seq_len, 1024), seed=config.seed)
            net.config.eos_token_id = net.generation_config.eos_token_id = tok.eos_token_id
            net.config.pad_token_id = net.generation_config.pad_token_id = tok.pad_token_id
            net.config.bos_token_id = net.generation_config.bos_token_id = tok.bos_token_id
        train = token_blocks(train_docs.texts(), tok, seq_len, max_train_tokens, progress=progress)
        val = token_blocks(val_docs.texts(), tok, seq_len, max_val_tokens)
        info: dict[str, Any] = {"corpus": data.name, "size": size if model is None else None, "base_model": model,
                                "seq_len": seq_len, "train_blocks": len(train), "val_blocks": len(val),
                                "vocab_size": len(tok)}
        trainer = Trainer(net, train, val, out, config, flops_per_token=training_flops_per_token(net, seq_len),
                          tokenizer=tok, run_info=info)
        return trainer.train()
