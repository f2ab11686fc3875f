"""The policy zoo: one small module per policy over `MemoryPolicy` (see base.py)."""

from __future__ import annotations

from pathlib import Path

from celeris.errors import CelerisError
from celeris.memory.policies.base import Budget, MemoryPolicy, parse_budget
from celeris.memory.policies.full import FullCache
from celeris.memory.policies.h2o import H2O
from celeris.memory.policies.l2norm import L2Norm
from celeris.memory.policies.namm import NAMM, NammConfig
from celeris.memory.policies.random_policy import RandomPolicy
from celeris.memory.policies.streaming_llm import StreamingLLM

POLICIES = {"full": FullCache, "streaming_llm": StreamingLLM, "l2": L2Norm, "h2o": H2O, "random": RandomPolicy, "namm": NAMM}
DEFAULT_NAMM = Path(__file__).resolve().parents[2] / "artifacts" / "memory"


def make_policy(spec: str) -> MemoryPolicy:
    """`NAME` or `namm:PATH` (a directory or file with namm.json + namm.safetensors).

    Plain `namm` loads the shipped parameters for the default model.
    """
    name, _, path = spec.partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise CelerisError(f"unknown memory policy {name!r}; valid: {', '.join(POLICIES)}")
    if name == "namm":
        target = Path(path) if path else DEFAULT_NAMM
        if not path and not (target / "namm.json").is_file():
            raise CelerisError("no shipped NAMM parameters found; give namm:PATH (see `celeris memory evolve`)")
        return NAMM.load(target)
    if path:
        raise CelerisError(f"policy {name!r} takes no parameter file")
    return POLICIES[name]()


__all__ = ["Budget", "MemoryPolicy", "parse_budget", "make_policy", "POLICIES", "NAMM", "NammConfig", "FullCache",
           "H2O", "L2Norm", "RandomPolicy", "StreamingLLM"]
