"""What the Flower apps and the validator share: the held-out set's type and checks on the arrays that travel.
(Its own module so that `validator` does not import `apps`, which builds the validated strategy from it.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord

from celeris.errors import CelerisError


def check_architecture(model: torch.nn.Module, arrays: ArrayRecord, who: str = "update") -> None:
    """Raise `CelerisError` unless `arrays` has exactly the model's parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(a.shape) for k, a in arrays.items()}
    if expected == got:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shape = [k for k in expected if k in got and expected[k] != got[k]]
    detail = (f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else
              f"{len(extra)} unexpected tensors (e.g. {extra[0]})" if extra else
              f"{shape[0]} has shape {got[shape[0]]}, expected {expected[shape[0]]}")
    raise CelerisError(f"architecture mismatch in {who}: {detail}")


def array_bytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord (what crosses the wire, before gRPC framing)."""
    return sum(len(a.data) for a in arrays.values())


@dataclass
class ValidationSet:
    """Held-out blocks `[n, seq_len]`, the UTF-8 bytes their targets stand for, and the ids of the held-out
    documents of this part (the blocks are cut from the first of them)."""

    blocks: torch.Tensor
    target_tokens: int
    target_bytes: int
    documents: list[str] = field(default_factory=list)
