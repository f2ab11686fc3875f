"""`celeris info`: versions, threads, the default model's cache state, and a model's shape."""

from __future__ import annotations

import platform
from typing import Any

import torch

from celeris.errors import CelerisError


def info(model: str | None = None) -> dict[str, Any]:
    """Environment facts; with `model`, also that model's size and shape (loads it)."""
    import transformers

    import celeris
    from celeris.models import (
        cache_root,
        default_gguf_path,
        default_model_dir,
        describe_model,
        is_converted,
        load_model,
    )

    out: dict[str, Any] = {
        "celeris": celeris.__version__,
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
    if model is not None:
        m, _ = load_model(None if model == "default" else model)
        out["model"] = describe_model(m)
    return out
