"""GGUF quantised blocks → the packed low-bit layouts of PyTorch's CPU kernels, without an fp32 detour.

This is the one hand-written piece of the engine: no library maps llama.cpp's blocks onto ATen's
`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` (GGUF block layouts: ggml's `ggml-common.h`).

Q4_1 block (32 weights, 20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; x = d·q + m with q in 0..15;
element j is the low nibble of byte j, element j + 16 the high nibble. The int4pack kernel computes
x = (q − 8)·scale + zero per group of 32, so scale = d, zero = m + 8·d, and q passes through as is:
the packed codes are bit-equal to the file's. With bf16 activations the kernel takes bf16 scales and
zeros, so the only loss is rounding d and m + 8d to bf16 (8 significant bits, unit roundoff 2⁻⁸): per
weight |Δx| ≤ |q − 8|·|Δd| + |Δzero| with |Δd| ≤ 2⁻⁸·|d| and |Δzero| ≤ 2⁻⁸·|m + 8d| (the kernel then
rounds its bf16 output as any bf16 matmul does).
Q4_0 block (18 bytes): fp16 d, 16 bytes of nibbles; x = d·(q − 8): scale = d, zero = 0.
Q8_0 block (34 bytes): fp16 d, 32 int8; x = d·q. `_weight_int8pack_mm` takes one scale per output
row, so each row is requantised to int8 with its own scale max|x|/127 (`q8_0_to_int8_rows`; its error
is measured, not assumed: `requantisation_error`).
Anything else (K-quants, Q5_x, IQ types, F16/BF16/F32 matrices) is dequantised one tensor at a time by
the `gguf` package and requantised to int4 group-32 (asymmetric, per group min/max) with the error
reported by `requantisation_error`.
"""

from __future__ import annotations

import numpy as np
import torch

from celeris.errors import CelerisError

GROUP = 32  # weights per GGUF block, and the int4 kernel's group size on this path
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _blocks(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """Raw uint8 bytes `[N, K/32·B]` (or flat) of an `[N, K]` tensor → `[N, K/32, B]`, checked."""
    n, k = shape
    b = _BLOCK_BYTES[kind]
    if k % GROUP:
        raise CelerisError(f"a {kind} tensor of shape {n}×{k} does not split into blocks of {GROUP}")
    need = n * (k // GROUP) * b
    if raw.dtype != np.uint8 or raw.size != need:
        raise CelerisError(f"a {kind} tensor of shape {n}×{k} needs {need:,} bytes, the file holds {raw.size:,} (truncated or corrupt)")
    return np.ascontiguousarray(raw).reshape(n, k // GROUP, b)


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, :, offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block → 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def q4_codes_and_affine(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 → (codes int32 `[N, K]` in 0..15, scale fp32 `[N, K/32]`, zero fp32 `[N, K/32]`).

    `x = (codes − 8)·scale + zero` reproduces the file's dequantised values exactly in fp32
    (m + 8·d of two fp16 numbers is exact in fp32 unless their exponents differ by more than 13).
    """
    blocks = _blocks(raw, kind, shape)
    d = _fp16(blocks, 0)
    if kind == "Q4_1":
        m, qs = _fp16(blocks, 2), blocks[:, :, 4:]
        zero = m + 8 * d
    else:
        qs = blocks[:, :, 2:]
        zero = np.zeros_like(d)
    codes = _nibbles(qs).reshape(shape[0], shape[1]).astype(np.int32)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero)


def q8_0_values(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 → (codes int8 `[N, K]`, block scales fp32 `[N, K/32]`); x = d·q."""
    blocks = _blocks(raw, "Q8_0", shape)
    d = _fp16(blocks, 0)
    q = blocks[:, :, 2:].copy().view(np.int8).reshape(shape)
    return torch.from_numpy(q), torch.from_numpy(d)


def q8_0_to_int8_rows(raw: np.ndarray, shape: tuple[int, int], chunk: int = 1024
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Q8_0 → one int8 scale per row, for `_weight_int8pack_mm`: (int8 `[N, K]`, scales fp32 `[N]`, error).

    Each row's values d_b·q are requantised as round(x / s) with s = max|x| / 127. A row whose blocks all
    share one d keeps its codes exactly; other blocks lose up to half a step of the row's scale. `error`
    is `requantisation_error` over the whole matrix. Converted `chunk` rows at a time, so no fp32 copy of
    the whole matrix is ever held.
    """
    blocks = _blocks(raw, "Q8_0", shape)
    n, k = shape
    out = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    sq_diff = sq_ref = max_abs = 0.0
    for s in range(0, n, chunk):  # chunk by chunk from the file's bytes: no copy of the whole matrix
        part = blocks[s : s + chunk]
        d = torch.from_numpy(_fp16(part, 0))
        q8 = torch.from_numpy(part[:, :, 2:].copy().view(np.int8))
        x = (q8.float() * d[:, :, None]).view(-1, k)
        sc = x.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(x / sc[:, None]).clamp(-127, 127)
        diff = q * sc[:, None] - x
        sq_diff, sq_ref = sq_diff + float(diff.double().pow(2).sum()), sq_ref + float(x.double().pow(2).sum())
        max_abs = max(max_abs, float(diff.abs().max()))
        out[s : s + chunk] = q.to(torch.int8)
        scales[s : s + chunk] = sc
    error = {"relative_rms": (sq_diff / max(sq_ref, 1e-30)) ** 0.5, "max_abs": max_abs,
             "reference_rms": (sq_ref / (n * k)) ** 0.5}
    return out, scales, error


def dequantize(raw: np.ndarray, type_id, shape: tuple[int, int]) -> torch.Tensor:
    """Any GGUF tensor type → fp32 `[N, K]` through the `gguf` package (one tensor at a time)."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        x = gguf_dequantize(raw, type_id)
    except (NotImplementedError, ValueError) as exc:
        raise CelerisError(f"GGUF tensor type {getattr(type_id, 'name', type_id)} cannot be read: {exc}") from None
    return torch.from_numpy(np.array(x, dtype=np.float32).reshape(shape))  # a writable copy


def int4_requantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float `[N, K]` → asymmetric int4 group-32 (codes `[N, K]`, scale, zero `[N, K/32]`) in the kernel's
    convention x ≈ (q − 8)·scale + zero."""
    n, k = w.shape
    if k % GROUP:
        raise CelerisError(f"int4 needs the input size to be a multiple of {GROUP}; this matrix is {n}×{k}")
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.view(n, k).to(torch.int32), scale, lo + 8 * scale


def affine_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q − 8)·scale + zero per group, fp32 `[N, K]` (for tests and error reports on a few rows)."""
    n, k = codes.shape
    x = (codes.float().view(n, k // GROUP, GROUP) - 8) * scale[..., None] + zero[..., None]
    return x.view(n, k)


def requantisation_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative RMS and max-abs error of `approx` against `reference` (both `[N, K]`)."""
    diff = (approx.float() - reference.float())
    return {"relative_rms": float(diff.pow(2).mean().sqrt() / reference.float().pow(2).mean().sqrt().clamp(min=1e-30)),
            "max_abs": float(diff.abs().max()), "reference_rms": float(reference.float().pow(2).mean().sqrt())}
