"""The fast decoding engine: a model's own low-bit weights, a static cache, compiled steps.

    engine = load_engine()                     # the default GGUF's Q4_1 / Q8_0 blocks, int4 / int8 kernels
    h, logits = engine.prefill(ids)            # then decode_step / verify_step / commit

`quantize`: `auto` (a GGUF file's own blocks; `none` for other models), `int4`, `int8` (GGUF blocks
mapped by hand in `gguf_blocks`; other models through torchao) or `none` (the float model as loaded,
whose greedy output equals Hugging Face `generate`). docs/engine.md has the measurements.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from celeris.engine.batch import BatchEngine
from celeris.engine.engine import Engine, EngineInfo, set_compile_cache_dir, weight_bytes
from celeris.errors import CelerisError

QUANTIZE_MODES = ("auto", "int4", "int8", "none")

__all__ = ["BatchEngine", "Engine", "EngineInfo", "QUANTIZE_MODES", "load_engine", "gguf_source", "set_threads"]


def gguf_source(name_or_path: str | os.PathLike | None) -> Path | None:
    """The GGUF file a model name refers to (the default model's, or a .gguf path), else None."""
    from celeris.models import DEFAULT_MODEL, default_gguf_path

    if name_or_path is None or str(name_or_path) in ("", "default", DEFAULT_MODEL):
        return default_gguf_path()
    p = Path(name_or_path).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise CelerisError(f"--threads must be a whole number of at least 1, got {threads}")
    torch.set_num_threads(threads)


def load_engine(
    model: str | os.PathLike | None = None,
    quantize: str = "auto",
    compile: bool = False,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    max_len: int | None = None,
    progress: bool = True,
) -> Engine:
    """An `Engine` over `model` (None: the default SmolLM2-135M-Instruct GGUF)."""
    from celeris.models import load_model, resolve_device

    if quantize not in QUANTIZE_MODES:
        raise CelerisError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    set_threads(threads)
    dev = resolve_device(device)
    if compile:
        set_compile_cache_dir()
    gguf = gguf_source(model)
    mode = ("int4" if gguf is not None else "none") if quantize == "auto" else quantize
    if dev.type != "cpu" and mode != "none":
        # The packed kernels here are CPU ones; on a GPU the engine runs bf16 weights (compiled where asked).
        m, tok = load_model(model, dtype="bfloat16", device=dev)
        info = EngineInfo("bf16", "bfloat16", compile, torch.get_num_threads(), weight_bytes(m))
        return Engine(m, tok, max_len, compile, info, progress)
    if mode == "none":
        m, tok = load_model(model, dtype="float32", device=dev)
        info = EngineInfo("none", "float32", compile, torch.get_num_threads(), weight_bytes(m))
        return Engine(m, tok, max_len, compile, info, progress)
    if gguf is not None:
        from celeris.engine.load import load_gguf_quantized

        m, tok, report = load_gguf_quantized(gguf, mode)
        info = EngineInfo(f"{mode}-gguf", "bfloat16", compile, torch.get_num_threads(), weight_bytes(m), report)
        return Engine(m, tok, max_len, compile, info, progress)
    from celeris.engine.quant import torchao_quantize

    m, tok = load_model(model, dtype="bfloat16", device=dev)
    torchao_quantize(m, mode)
    info = EngineInfo(f"{mode}-torchao", "bfloat16", compile, torch.get_num_threads(), weight_bytes(m))
    return Engine(m, tok, max_len, compile, info, progress)
