"""Build an engine model: a GGUF file's own blocks swapped into an HF skeleton, or an HF model quantised by torchao.

`load_gguf_quantized(path)` reads config and tokenizer from the GGUF metadata (cached once as a small
directory, no weights), builds the HF model on the meta device (no weights allocated), and replaces
each linear layer by an `Int4Linear` / `Int8Linear` filled from the file's blocks (`gguf_blocks`),
the token embedding by an `Int8Embedding` sharing the output layer's int8 matrix when they are tied,
and the norms by their F32 vectors. No fp32 copy of the weights is built. Every tensor of the file
must find its place and every parameter of the model must be filled, or loading fails naming them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from celeris.engine import gguf_blocks as G
from celeris.engine.quant import FusedPart, FusedProjection, Int4Linear, Int8Embedding, Int8Linear
from celeris.errors import CelerisError
from celeris.io import _first_line, atomic_dir, write_json

_META_MARKER = "celeris-gguf-meta.json"
# GGUF architectures whose Q and K rows llama.cpp's converter permuted (HF's loader undoes it the same way)
_PERMUTED_QK = ("llama",)


def _reverse_permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order for Q/K: rows (head, pair, half) → (head, half, pair)."""
    dim = t.shape[0] // heads // 2
    return t.reshape(heads, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_meta_dir(path: Path) -> Path:
    """Config and tokenizer of a GGUF file, written once beside the model cache (no weights)."""
    from celeris.models import _file_fingerprint, align_gguf_tokenizer, cache_root

    out = cache_root() / "models" / f"{path.stem}-{_file_fingerprint(path)}-meta"
    if (out / _META_MARKER).is_file():
        return out
    from transformers import AutoConfig, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:
            raise CelerisError(f"cannot read GGUF file {path}: {_first_line(exc)}") from None
        align_gguf_tokenizer(tok, config)  # as the fp32 conversion does
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / _META_MARKER, {"source": str(path)})
    return out


def _int4_from_tensor(t, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(codes, scale, zero, how) for one GGUF matrix: Q4_0/Q4_1 as they are, anything else requantised."""
    kind = t.tensor_type.name
    if kind in ("Q4_0", "Q4_1"):
        codes, scale, zero = G.q4_codes_and_affine(t.data, kind, shape)
        return codes, scale, zero, {"source": kind, "exact_codes": True}
    w = G.dequantize(t.data, t.tensor_type, shape)
    codes, scale, zero = G.int4_requantise(w)
    err = G.requantisation_error(w, G.affine_values(codes, scale, zero))
    return codes, scale, zero, {"source": kind, "exact_codes": False, **err}


def _int8_from_tensor(t, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(int8, per-row scales, how) for one GGUF matrix (Q8_0 blockwise → per row; others dequantised first)."""
    kind = t.tensor_type.name
    if kind == "Q8_0":
        q, s, err = G.q8_0_to_int8_rows(t.data, shape)
        return q, s, {"source": kind, **err}
    w = G.dequantize(t.data, t.tensor_type, shape)
    s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s, {"source": kind, **G.requantisation_error(w, q.float() * s[:, None])}


FUSE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fuse_projections(model: nn.Module) -> int:
    """Replace each group of `FUSE` siblings that are all `Int4Linear` by one `FusedProjection`; returns groups fused."""
    groups = 0
    for parent in model.modules():
        for names in FUSE:
            layers = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, Int4Linear) for m in layers) or len({m.in_features for m in layers}) != 1:
                continue
            fused = Int4Linear.__new__(Int4Linear)
            nn.Module.__init__(fused)
            fused.in_features, fused.group_size = layers[0].in_features, layers[0].group_size
            fused.out_features = sum(m.out_features for m in layers)
            fused.register_buffer("packed", torch.cat([m.packed for m in layers]))
            fused.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in layers], dim=1))
            owner = FusedProjection(fused, [m.out_features for m in layers])
            for i, n in enumerate(names):
                setattr(parent, n, FusedPart(owner, i))
            groups += 1
    return groups


def load_gguf_quantized(path: str | Path, mode: str = "int4", dtype: torch.dtype = torch.bfloat16, fuse: bool = True):
    """(model, tokenizer, report) for a GGUF causal LM, linear layers int4 (`mode="int4"`) or int8 per row.

    The embedding / output layer is int8 per row in both modes. `report` lists per tensor kind how its
    weights were mapped and the requantisation error where there is one.
    """
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise CelerisError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as exc:
        raise CelerisError(f"cannot read GGUF file {path}: {_first_line(exc)}") from None
    meta = gguf_meta_dir(path)
    config = AutoConfig.from_pretrained(meta)
    tokenizer = AutoTokenizer.from_pretrained(meta)
    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise CelerisError(f"GGUF architecture {arch!r} is not known to the gguf package")
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    mapped = getattr(reader.data, "_mmap", None)

    def release_pages() -> None:
        """Drop the file's pages read so far from this process's resident memory (they are clean and
        file-backed: read again from the page cache if touched), so loading peaks near the packed size."""
        if mapped is not None and hasattr(mapped, "madvise"):
            import mmap

            mapped.madvise(mmap.MADV_DONTNEED)
    used: set[str] = set()
    report: dict[str, dict[str, Any]] = {}

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    def gguf_tensor(hf_name: str):
        base = names.get_name(hf_name)
        t = tensors.get(f"{base}.weight") if base else None
        return t, (f"{base}.weight" if base else None)

    def note(kind: str, how: dict[str, Any]) -> None:
        r = report.setdefault(f"{how['source']} → {kind}", {"tensors": 0})
        r["tensors"] += 1
        for k, v in how.items():
            if isinstance(v, float):
                r[k] = max(r.get(k, 0.0), v)  # the worst tensor of the kind

    # the output layer first: the embedding shares its int8 matrix when the model ties them
    out_t, out_name = gguf_tensor("lm_head")
    emb_t, emb_name = gguf_tensor("model.embed_tokens")
    if emb_t is None:
        raise CelerisError(f"{path} has no token embedding tensor")
    head_src, head_name = (out_t, out_name) if out_t is not None else (emb_t, emb_name)
    shape = (int(head_src.shape[1]), int(head_src.shape[0]))
    q, s, how = _int8_from_tensor(head_src, shape)
    head = Int8Linear(q, s)
    note("int8 per row", how)
    used.add(head_name)
    release_pages()
    model.lm_head = head
    if out_t is None:
        model.get_decoder().embed_tokens = Int8Embedding(head, dtype)
        used.add(emb_name)
    else:
        q, s, how = _int8_from_tensor(emb_t, (int(emb_t.shape[1]), int(emb_t.shape[0])))
        model.get_decoder().embed_tokens = Int8Embedding(Int8Linear(q, s), dtype)
        used.add(emb_name)
        note("int8 per row", how)

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        t, gname = gguf_tensor(name)
        if t is None:
            raise CelerisError(f"{path} has no tensor for {name}")
        if module.bias is not None:
            raise CelerisError(f"{name} has a bias, which the GGUF engine does not load yet; use --quantize none")
        shape = (int(t.shape[1]), int(t.shape[0]))
        if shape != (module.out_features, module.in_features):
            raise CelerisError(f"GGUF tensor {gname} is {shape[0]}×{shape[1]}, the model's {name} is "
                               f"{module.out_features}×{module.in_features}")
        permute = arch in _PERMUTED_QK and (name.endswith("q_proj") or name.endswith("k_proj"))
        rows_heads = heads if name.endswith("q_proj") else kv_heads
        if mode == "int4":
            codes, scale, zero, how = _int4_from_tensor(t, shape)
            if permute:
                codes, scale, zero = (_reverse_permute_rows(x, rows_heads) for x in (codes, scale, zero))
            new: nn.Module = Int4Linear(codes, scale, zero)
            note("int4 group 32", how)
        else:
            q, s, how = _int8_from_tensor(t, shape)
            if permute:
                q, s = _reverse_permute_rows(q, rows_heads), _reverse_permute_rows(s, rows_heads)
            new = Int8Linear(q, s)
            note("int8 per row", how)
        model.set_submodule(name, new)
        used.add(gname)
        release_pages()

    # the remaining parameters (norms) are plain F32 vectors in the file
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        t, gname = gguf_tensor(mod_name)
        if t is None or attr != "weight":
            raise CelerisError(f"{path} has no tensor for {name}")
        value = G.dequantize(t.data, t.tensor_type, (1, int(t.data.size))).view(p.shape)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(value.to(dtype), requires_grad=False))
        used.add(gname)
    rot = model.get_decoder().rotary_emb  # its inv_freq buffer is computed, not stored: build it for real
    model.get_decoder().rotary_emb = type(rot)(config=config, device="cpu")
    left = [n for n, b in list(model.named_parameters()) + list(model.named_buffers()) if b.is_meta]
    if left:
        raise CelerisError(f"the GGUF file does not fill {len(left)} model tensor(s): {', '.join(left[:4])}")
    unused = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if unused:
        raise CelerisError(f"{path} holds {len(unused)} tensor(s) this model does not use: {', '.join(unused[:4])}")
    if fuse:
        _fuse_projections(model)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, report
