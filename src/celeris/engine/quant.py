"""Weight-only low-bit layers over PyTorch's packed CPU kernels, swapped into an unmodified HF model.

`Int4Linear` wraps `aten._weight_int4pack_mm_for_cpu` (int4 codes, bf16 scale and zero per group of
32 input weights); `Int8Linear` wraps `aten._weight_int8pack_mm` (int8, one scale per output row);
`Int8Embedding` looks rows up in the same int8 matrix, so a tied embedding / output layer is held once.
All take and return the activations' dtype; the kernels run in bf16 (their fp32-activation paths are
5–50× slower on the CPUs measured, docs/engine.md).

For models that are not GGUF files, `torchao_quantize` hands the job to torchao (its int8 weight-only
config, and the CPU int4 layout of its prototype namespace).
"""

from __future__ import annotations

import torch
from torch import nn

from celeris.errors import CelerisError

INNER_K_TILES = 2  # the CPU packer's tile argument; the layout it picks is the kernel's own
# The int4 kernel is fast for a few rows (decoding, verify steps) and slow for many (it does the whole
# dequantisation per row block): from this many rows on, a layer is dequantised to bf16 once per call
# and multiplied by the bf16 GEMM instead (prompt processing). Above every verify size, so a verify
# step's rows always go through the same kernel as a plain step's.
DENSE_FROM_ROWS = 48


def _unpack_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes `[n, k]` (uint8 0..15) of a CPU int4pack tensor.

    Layout of `_convert_weight_to_int4pack_for_cpu` (torch 2.13, checked by `_layout_ok` before use): rows in
    blocks of 64, bytes `[n/64, k, 32]`; byte d of (block, k) holds row d's code in its low nibble and row
    d + 32's in its high nibble."""
    p = packed.view(torch.uint8).view(n // 64, k, 32)
    return torch.cat([p & 15, p >> 4], dim=2).transpose(1, 2).reshape(n, k)


_LAYOUT: list[bool] = []


def _layout_ok() -> bool:
    """Does `_unpack_codes` read this torch's packed layout? Checked once per process on random codes."""
    if not _LAYOUT:
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        _LAYOUT.append(packed.numel() * packed.element_size() == 128 * 32 and torch.equal(_unpack_codes(packed, 128, 64).int(), q))
    return _LAYOUT[0]


class Int4Linear(nn.Module):
    """y = x · Wᵀ with W = (q − 8)·scale + zero per group of `group_size` along the input; no bias."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 32):
        """codes int32 `[N, K]` in 0..15; scale, zero `[N, K/group_size]` (any float dtype)."""
        super().__init__()
        n, k = codes.shape
        if k % group_size or group_size not in (32, 64, 128, 256):
            raise CelerisError(f"int4 weights need the input size ({k}) to be a multiple of the group size {group_size} (32, 64, 128 or 256)")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] >= DENSE_FROM_ROWS and self.out_features % 64 == 0 and _layout_ok():
            y = torch.nn.functional.linear(x2, self.dense_weight())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The bf16 weight `[N, K]`: (q − 8)·scale + zero computed in bf16 (one more rounding than the kernel's
        fp32 dequantisation: this path serves prompt processing only, never a decoding or verify step)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        codes = _unpack_codes(self.packed, n, k).view(n, k // g, g).to(torch.bfloat16)
        sz = self.scales_and_zeros.transpose(0, 1)  # [N, K/g, 2] bf16
        scale = sz[..., :1].contiguous()
        return torch.addcmul((sz[..., 1:] - 8 * scale).contiguous(), codes, scale).reshape(n, k).contiguous()

    @property
    def weight_bytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


class FusedProjection(nn.Module):
    """Several projections of the same input as ONE packed product (Q, K, V; or gate and up).

    The model's own modules keep calling `q_proj(x)`, `k_proj(x)`, `v_proj(x)` in that order: the first call
    computes the fused product and keeps its parts, the later ones hand out their part (`FusedPart`). One
    kernel call instead of three reads the same bytes with fewer thread launches and better balance across
    threads; each output element is the same dot product, so results are unchanged.
    """

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self._parts: tuple[torch.Tensor, ...] = ()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if index == 0:
            self._parts = self.fused(x).split(self.sizes, dim=-1)
        return self._parts[index]


class FusedPart(nn.Module):
    """Part `index` of a `FusedProjection` (index 0 must be called first, on the shared input)."""

    def __init__(self, owner: FusedProjection, index: int):
        super().__init__()
        self.owner, self.index = [owner], index  # a list: the owner is registered once, on the first part
        if index == 0:
            self.shared = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner[0].part(x, self.index)


class Int8Linear(nn.Module):
    """y = x · Wᵀ (+ bias) with W = q·scale (one scale per output row)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """A float `nn.Linear` rounded to int8 per output row (symmetric, scale = max |w| / 127)."""
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        return cls((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.q, self.scales)
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_bytes(self) -> int:
        return self.q.numel() + self.scales.numel() * 2 + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


class Int8Embedding(nn.Module):
    """Embedding rows q[i]·scale[i] of an `Int8Linear`'s matrix (a tied input/output layer held once)."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.table = [table]  # a list, so the shared layer is not registered (or counted) twice
        self.num_embeddings, self.embedding_dim = table.q.shape
        self.dtype = dtype

    @property
    def weight(self):  # HF reads `.weight.dtype` / `.weight.device` of the input embedding in places
        return self.table[0].scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        return (t.q[ids].to(self.dtype) * t.scales[ids, None].to(self.dtype))


def torchao_quantize(model: nn.Module, mode: str) -> None:
    """Weight-only int8 / int4 (group 32) for an HF model's linear layers, in place, through torchao."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise CelerisError(f"--quantize {mode} on a model that is not a GGUF file needs torchao: pip install 'celeris[engine]'") from None
    if mode == "int8":
        config = Int8WeightOnlyConfig()
    else:  # the CPU layout (the ATen int4pack kernel) lives in torchao's prototype namespace in 0.18
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=32)
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % 32]
    if mode == "int4" and bad:
        raise CelerisError(f"--quantize int4 needs input sizes that are multiples of 32; {bad[0]} has {model.get_submodule(bad[0]).in_features}")
    quantize_(model, config)
