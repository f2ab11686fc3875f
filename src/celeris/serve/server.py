"""`serve`: load the engine (and a drafter), decode on this thread and run the app on uvicorn beside it, until Ctrl-C / SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from celeris.errors import CelerisError

DRAIN_SECONDS = 5.0  # after Ctrl-C / SIGTERM, in-flight answers get this long to finish
API_KEY_ENV = "CELERIS_API_KEY"


DEFAULT_MAX_BATCH = 4  # without a memory policy; with one, requests are decoded one at a time


def max_batch_for(max_batch: int | None, drafter: str | None, memory: str | None = None) -> int:
    """`--max-batch` as given, or its default: 4 (a drafter then decodes a request while it is alone), 1 under a
    memory policy."""
    if max_batch is not None:
        return max_batch
    return 1 if memory else DEFAULT_MAX_BATCH


def check_serve_options(drafter: str | None = "none", port: int = 8000, max_batch: int | None = None,
                        max_context: int | None = None, api_key: str | None = None, max_queue: int = 16,
                        memory: str | None = None, budget: str | None = None) -> Path | None:
    """Every option checked before anything is loaded; returns the drafter directory (None: no drafter)."""
    max_batch = max_batch_for(max_batch, drafter, memory)
    if max_batch < 1:
        raise CelerisError(f"--max-batch must be at least 1, got {max_batch}")
    if memory:
        from celeris.memory import make_policy, parse_budget

        make_policy(memory)  # an unknown name or unreadable parameters: one line now, not at the first request
        parse_budget(budget or "0.25")
        if max_batch > 1:
            raise CelerisError(f"--max-batch {max_batch} with --memory: requests under a memory policy decode one "
                               "at a time; use --max-batch 1")
    elif budget is not None:
        raise CelerisError("--budget needs --memory")
    if not 0 <= port <= 65535:
        raise CelerisError(f"--port must be in 0..65535, got {port}")
    if max_context is not None and max_context < 2:
        raise CelerisError(f"--max-context must be at least 2 tokens, got {max_context}")
    if max_queue < 1:
        raise CelerisError(f"--max-queue must be at least 1, got {max_queue}")
    if api_key is not None and not api_key.strip():
        raise CelerisError(f"--api-key (or ${API_KEY_ENV}) is empty; give a key or leave it out")
    if drafter in (None, "", "none"):
        return None
    from celeris.speculative.bench import default_drafter_dir

    path = default_drafter_dir() if drafter == "default" else Path(drafter).expanduser()
    if not (path / "drafter.json").is_file():
        raise CelerisError(f"--drafter {drafter}: no drafter in {path} (a directory with drafter.json, 'default' or 'none')")
    return path


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_worker(model: str | None = None, drafter: str | None = "none", max_context: int | None = None,
                quantize: str = "auto", compile: bool = False, threads: int | None = None, max_queue: int = 16,
                prefix_cache: bool = True, max_batch: int | None = None, memory: str | None = None,
                budget: str | None = None):
    """The engine for `model` and a `ModelWorker` over it (not started), with ReDrafter when `drafter` names one,
    decoding up to `max_batch` requests together (default: `max_batch_for`)."""
    from celeris.engine import gguf_source, load_engine
    from celeris.serve.worker import ModelWorker

    path = check_serve_options(drafter, max_batch=max_batch, max_context=max_context, max_queue=max_queue,
                               memory=memory, budget=budget)
    engine = load_engine(model, quantize=quantize, compile=compile, threads=threads, max_len=max_context)
    draft = None
    if path is not None:
        from celeris.speculative.engine_decoding import load_drafter_for_engine

        draft = load_drafter_for_engine(path, engine, gguf_source(model)).to(engine.device).eval()
    worker = ModelWorker(engine, draft, max_queue=max_queue, prefix_cache=prefix_cache,
                         max_batch=max_batch_for(max_batch, drafter, memory),
                         memory=(memory, budget or "0.25") if memory else None)
    worker.warm_up()
    return worker


def serve(model: str | None = None, drafter: str | None = "none", host: str = "127.0.0.1", port: int = 8000,
          max_batch: int | None = None, max_context: int | None = None, api_key: str | None = None, quantize: str = "auto",
          compile: bool = False, threads: int | None = None, max_queue: int = 16,
          drain_seconds: float = DRAIN_SECONDS, memory: str | None = None, budget: str | None = None) -> None:
    """Serve `model` over the OpenAI API on host:port until Ctrl-C / SIGTERM (then in-flight answers get
    `drain_seconds` to finish). `api_key` None reads $CELERIS_API_KEY; no key = no authentication."""
    import uvicorn

    from celeris.models import DEFAULT_MODEL
    from celeris.serve.app import create_app

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    check_serve_options(drafter, port, max_batch, max_context, api_key, max_queue, memory, budget)
    worker = load_worker(model, drafter, max_context, quantize, compile, threads, max_queue, max_batch=max_batch,
                         memory=memory, budget=budget)
    model_id = DEFAULT_MODEL if model in (None, "", "default") else str(model)
    app = create_app(worker, model_id, api_key)
    how = "ReDrafter" if worker.drafter is not None else "plain decoding"
    if worker.memory is not None:
        how += f" under the memory policy {worker.memory[0]} at budget {worker.memory[1]} (greedy)"
    where = f"http://{host}:{port}" if port else f"{host}, a free port (uvicorn names it below)"
    print(f"serving {model_id} ({worker.engine.info.quantize}, {how}, context {worker.max_context} tokens, "
          f"{_batching(worker.max_batch)}) on {where} — chat page at /, API at /v1", file=sys.stderr, flush=True)
    if not is_loopback(host) and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_seconds,
                                          log_level="info"))
    if threading.current_thread() is not threading.main_thread():  # called from a thread: uvicorn here, model on its own
        server.run()
        return
    # The model decodes on this thread, the one that loaded it (`ModelWorker.run` says why); uvicorn runs beside it.
    worker.runs_on_caller = True

    def on_signal(signum, frame) -> None:  # as uvicorn's own: drain on the first, stop at once on a second Ctrl-C
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    def http() -> None:
        try:
            server.run()
        finally:
            worker.stop(0)  # the app's shutdown stops the worker; this covers uvicorn failing before that

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=http, name="celeris-http")
    thread.start()
    try:
        worker.run()
    finally:  # the model loop ended (stopped, or failed): the HTTP server goes too
        server.should_exit = True
        thread.join()
    if not server.started:  # e.g. the port was taken: uvicorn said why
        sys.exit(1)


def _batching(max_batch: int) -> str:
    return "one sequence at a time" if max_batch == 1 else f"up to {max_batch} sequences decoded together"
