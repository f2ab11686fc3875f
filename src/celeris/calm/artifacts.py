"""Shipped checkpoints and model loading: `calm:default` (CALM + its autoencoder) and `calm:baseline`
(the Transformer trained on the same tokens), registered in `celeris.models.MODEL_ALIASES`."""

from __future__ import annotations

from pathlib import Path

from celeris.errors import CelerisError
from celeris.io import read_json
from celeris.models import MODEL_ALIASES

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "calm"


def _artifact(name: str):
    def resolve() -> Path:
        path = ARTIFACTS / name
        if not (path / "config.json").is_file():
            raise CelerisError(f"the shipped checkpoint calm:{name} is missing from {path}; rebuild it with `celeris bench calm --ship`")
        return path
    return resolve


def register_aliases() -> None:
    MODEL_ALIASES.setdefault("calm:default", _artifact("default"))
    MODEL_ALIASES.setdefault("calm:baseline", _artifact("baseline"))
    MODEL_ALIASES.setdefault("calm:ae", _artifact("default/ae"))


def tokenizer_dir(ae_dir: Path) -> Path:
    """An autoencoder's tokenizer: next to it, or in the CALM directory that holds it as `ae/`."""
    return ae_dir if (ae_dir / "tokenizer.json").is_file() else ae_dir.parent


def is_calm_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and read_json(cfg, "model config").get("celeris_type") == "calm"


def resolve(name: str | None, default: str = "calm:default") -> Path:
    name = name or default
    if name in MODEL_ALIASES:
        return Path(MODEL_ALIASES[name]())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CelerisError(f"model directory not found: {name}")
    return path


def load_calm(name: str | None = None, ae: str | None = None):
    """(CALM model, tokenizer) from a directory or alias (default `calm:default`); `ae` overrides its autoencoder."""
    from transformers import AutoTokenizer

    from celeris.calm.model import CALM

    path = resolve(name)
    if not is_calm_dir(path):
        raise CelerisError(f"{path} does not hold a CALM model (train one with `celeris calm train`)")
    model = CALM.load(path, resolve(ae, default="") if ae else None)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:
        raise CelerisError(f"no tokenizer in {path}") from None
    return model, tok


def load_any(name: str | None):
    """A CALM directory/alias gives a CALM model; anything else goes through `celeris.load_model`."""
    from celeris.models import load_model

    if name is not None and (name in MODEL_ALIASES or Path(name).expanduser().is_dir()):
        path = resolve(name)
        if is_calm_dir(path):
            return load_calm(str(path))
        return load_model(str(path))
    return load_model(name)
