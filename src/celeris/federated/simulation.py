"""`simulate`: a whole federation on one machine, on Flower's Simulation Runtime.

Flower's `run_simulation` runs the ServerApp against an in-memory SuperLink (LinkState, InMemoryGrid,
message routing, per-node Contexts) and executes ClientApps through a simulation backend. Flower
1.41 hard-wires Ray as that backend; Ray starts a GCS, a raylet and worker processes per run, which
is far heavier than the ClientApps themselves on a small CPU box. `InProcessBackend` implements
Flower's own `Backend` interface and runs each ClientApp call in the engine's worker thread, one
message at a time, so everything else (the message path, node ids, errors as `Message`s) is Flower's.
Pass `backend="ray"` to use Ray instead (needs `flwr[simulation]`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from celeris.errors import CelerisError
from celeris.federated.apps import FederationSpec, client_blocks, make_client_app, make_server_app

_RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


class InProcessBackend(Backend):
    """Flower simulation backend that runs ClientApps in this process, one message at a time."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1  # one ClientApp at a time: the machine has few cores and torch uses one each

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise RuntimeError("InProcessBackend.build() was not called")
        return self.app_fn()(message, context), context


@contextlib.contextmanager
def _inprocess_backend() -> Iterator[None]:
    """Make Flower's Simulation Runtime construct `InProcessBackend` where it imports RayBackend."""
    shim = types.ModuleType(_RAY_BACKEND_MODULE)
    shim.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    saved = sys.modules.get(_RAY_BACKEND_MODULE)
    sys.modules[_RAY_BACKEND_MODULE] = shim
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(_RAY_BACKEND_MODULE, None)
        else:
            sys.modules[_RAY_BACKEND_MODULE] = saved


class _QuietDrops(logging.Filter):
    """Hide Flower's tracebacks for simulated drop-outs (they are expected; the round log keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "ClientDropped" not in msg and "dropped out of round" not in msg


def run_flower_simulation(server_app, client_app: ClientApp, num_supernodes: int, backend: str = "inprocess") -> None:
    """`flwr.simulation.run_simulation` with the in-process backend (default) or Ray."""
    from flwr.simulation import run_simulation

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _QuietDrops) for f in flwr_log.filters):
        flwr_log.addFilter(_QuietDrops())
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise CelerisError('the ray backend needs Ray: pip install "flwr[simulation]" (or use --backend inprocess)')
        run_simulation(server_app, client_app, num_supernodes=num_supernodes, backend_name="ray",
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        return
    if backend != "inprocess":
        raise CelerisError(f"unknown simulation backend {backend!r}; choose inprocess or ray")
    with _inprocess_backend():
        run_simulation(server_app, client_app, num_supernodes=num_supernodes, backend_name="inprocess")


def simulate(spec: FederationSpec, out_dir: str | Path | None = None, backend: str = "inprocess",
             client_sizes: dict[int, str] | None = None, mods: list | None = None,
             data_fn: Callable[[FederationSpec, int], torch.Tensor] | None = None) -> dict[str, Any]:
    """Run `spec` on Flower's Simulation Runtime; return the summary (see `RoundLog.summary`).

    `out_dir` receives rounds.jsonl, summary.json and model/ (safetensors + config + tokenizer).
    `client_sizes` gives some clients another model size (their updates must be rejected);
    `mods` are Flower client mods (e.g. `LocalDpMod`, or an auditing mod in tests)."""
    spec.validate()
    if spec.dp_clip is not None:
        from flwr.clientapp.mod import LocalDpMod

        mods = [*(mods or []), LocalDpMod(spec.dp_clip, spec.dp_clip, spec.dp_epsilon, 1e-5)]
    done: dict[str, Any] = {}
    errors: list[BaseException] = []
    sizes = client_sizes or {}

    def on_done(summary: dict[str, Any]) -> None:
        done.update(summary)

    base_data_fn = data_fn or client_blocks

    def checked_data(s: FederationSpec, pid: int) -> torch.Tensor:
        blocks = base_data_fn(s, pid)
        if len(blocks) == 0:
            raise CelerisError(f"client {pid} has no training blocks of {s.seq_len} tokens")
        return blocks

    server = make_server_app(spec, out_dir, on_done=on_done)
    client = make_client_app(spec, checked_data, size_fn=lambda pid: sizes.get(pid), mods=mods)
    try:
        run_flower_simulation(server, client, spec.clients, backend)
    except CelerisError:
        raise
    except Exception as exc:  # Flower re-raises the ServerApp's exception; keep a user error readable
        errors.append(exc)
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, CelerisError):
            cause = cause.__cause__
        if isinstance(cause, CelerisError):
            raise cause from None
        raise
    if not done:
        raise CelerisError("the federation ended without a result (see the Flower log above)")
    done.pop("_final_arrays", None)
    return done
