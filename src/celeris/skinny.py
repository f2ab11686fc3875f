"""Faster CPU matmuls for "skinny" inputs: a few rows through a large `nn.Linear`.

A speculative verify step sends 2-16 tokens through every linear layer of the target. On a CPU,
PyTorch's `F.linear(x, W)` (MKL `x @ Wᵀ`) is slow for 2-8 rows: on the 2-core machine of
docs/speculative.md the 210 linear layers of SmolLM2-135M take ~57 ms for 5 rows against ~37 ms for
one. Computing the same product as `(W @ xᵀ)ᵀ` (MKL with the weight as the tall left operand) takes
~32 ms for 5 rows: the weights are read once, at memory speed, as for one row.

`skinny_linear(model)` is a context manager that routes the model's `nn.Linear` layers through that
form while it is active, for CPU float inputs of `2..max_rows` rows; anything else goes through
`F.linear` unchanged. No modeling file is touched: it sets, then removes, an instance `forward`.
Results agree with `F.linear` to float rounding (a different summation order), like any change of
batch shape; greedy identity is checked end to end by the tests and by `celeris bench speculative`.

Whether the form pays depends on the CPU and its BLAS: on another 2-core machine (stop 22) the same
5-row step took 80 ms this way against 57 ms through `F.linear`. `skinny_helps(model)` times both forms
once per process on the model's largest linear layer and says which is faster; ReDrafter's decoding
uses the skinny form only where it is (`skinny_linear(model, auto=True)`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16
_HELPS: dict[tuple, bool] = {}


def _skinny_forward(layer: nn.Linear, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not (2 <= rows <= max_rows) or x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32:
            return F.linear(x, layer.weight, layer.bias)
        y = torch.mm(layer.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], layer.weight.shape[0])

    return forward


def skinny_helps(model: nn.Module, rows: int = 5, repeats: int = 7) -> bool:
    """Is `(W @ xᵀ)ᵀ` faster than `F.linear` here, for `rows` rows through `model`'s largest CPU float32 layer?

    Measured once per (weight shape, rows, threads) and process: the median of `repeats` timings of each form."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32]
    if not layers:
        return False
    w = max(layers, key=lambda m: m.weight.numel()).weight
    key = (tuple(w.shape), rows, torch.get_num_threads())
    if key not in _HELPS:
        x = torch.randn(rows, w.shape[1])

        def median_time(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        with torch.inference_mode():
            _HELPS[key] = median_time(lambda: torch.mm(w, x.t())) < median_time(lambda: F.linear(x, w))
    return _HELPS[key]


@contextlib.contextmanager
def skinny_linear(model: nn.Module, max_rows: int = MAX_ROWS, auto: bool = False) -> Iterator[nn.Module]:
    """While active, `nn.Linear` layers of `model` (exactly that type) compute 2..max_rows rows as `(W @ xᵀ)ᵀ`.

    With `auto`, only where `skinny_helps(model)` says the form is faster on this machine; else a no-op."""
    if auto and not skinny_helps(model):
        yield model
        return
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _skinny_forward(m, max_rows)
    try:
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
