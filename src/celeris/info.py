"""`celeris info`: versions, threads, the default model's cache state, and a model's shape."""

from __future__ import annotations

import platform
from typing import Any

import torch

from celeris.errors import CelerisError


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark records and cache keys."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        return cpu


def info(model: str | None = None) -> dict[str, Any]:
    """Environment facts; with `model`, also that model's size and shape (loads it)."""
    import transformers

    from celeris.models import (
        cache_root,
        default_gguf_path,
        default_model_dir,
        describe_model,
        is_converted,
        load_model,
    )
    from celeris.version import __version__

    out: dict[str, Any] = {
        "celeris": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cache_dir": str(cache_root()),
    }
    try:
        gguf = default_gguf_path()
        d = default_model_dir()
        out["default_model"] = {"gguf": str(gguf), "cache": str(d), "converted": is_converted(d)}
    except CelerisError as exc:
        out["default_model"] = {"error": str(exc)}
    out["engine"] = engine_facts()
    if model is not None:
        m, _ = load_model(None if model == "default" else model)
        out["model"] = describe_model(m)
        from celeris.engine import load_engine

        e = load_engine(None if model == "default" else model, progress=False)
        out["engine"]["model"] = {"quantize": e.info.quantize, "weight_bytes": e.info.weight_bytes,
                                  **{f"mapping {k}": v for k, v in e.info.mapping.items()}}
    return out


def engine_facts() -> dict[str, Any]:
    """What `celeris generate` runs on here, without loading a model."""
    import importlib.util

    from celeris.engine.quant import _layout_ok
    from celeris.models import cache_root

    peer = "not installed (make peers)"
    if importlib.util.find_spec("llama_cpp") is not None:
        from importlib.metadata import version

        peer = version("llama-cpp-python")
    return {"default": "a GGUF model's own blocks: Q4_0/Q4_1 → int4 kernel, Q8_0 → int8 per row; other models "
                       "float (--quantize int4/int8 through torchao)",
            "int4_layout_checked": _layout_ok(), "compile_cache": str(cache_root() / "inductor"),
            "llama_cpp_peer": peer}
