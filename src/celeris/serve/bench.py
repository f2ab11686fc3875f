"""`celeris bench serve`: `celeris serve` under 1, 4, 8 concurrent clients, with a llama.cpp server beside it.

Each server is a subprocess on its own ephemeral 127.0.0.1 port (the port its log reports), started by the
bench and stopped at the end. The clients are threads running the official `openai` client, streaming chat
completions of the benchmark prompts (`celeris.speculative.prompts.EVAL_PROMPTS`), greedy, `max_tokens`
each. Per concurrency level and repeat, `requests` requests are shared among the clients (no new one starts
after `timeout` seconds; one still streaming then is cut and counted as an error). Figures per level:
- output tokens/s: completed requests' output tokens over the level's wall time (all clients together);
- time to first token (request sent → first content chunk) and request latency, p50 and p95;
- errors (HTTP status or exception name).
Repeats are interleaved (repeat → level → server, both servers up the whole run, only one loaded at a time)
so machine drift falls on both alike (the server order rotated each repeat); the table shows the median over
repeats (default 5) and the min–max, the JSON each figure as `{"median", "min", "max", "runs"}` and the
environment record (commit, machine, versions, sha256 of the GGUF and the drafter).

The peer runs on the same GGUF, greedy, with the same thread count and the same client code. `--peer auto` (the
default) takes the best one installed and the result says which ran and why a better one did not:
- `llama-server`: llama.cpp's own server, built by `make peers` (scripts/build_llama_server.sh) from the llama.cpp
  source that the pinned llama-cpp-python vendors, into the venv's bin (else found on PATH). Started with
  `--parallel P` slots (4, its documented setting for concurrent clients; continuous batching is its default) and
  `--ctx-size P * n_ctx`, since the context is split among the slots: each request gets n_ctx, as on the other peer.
  Its repeat penalty is off by default; it sends `usage`.
- `llama-cpp-python`: its `python -m llama_cpp.server` (`pip install 'celeris[peers]'`). It answers one request at
  a time, so its concurrent clients queue (started with `--interrupt_requests False`: by default a new request
  cuts the one streaming). It applies a repeat penalty of 1.1 unless told otherwise, so its requests carry
  `repeat_penalty: 1.0` (plain greedy, as Celeris).
Output tokens come from the stream's `usage` where the server sends it (`stream_options.include_usage`),
else from the count of content chunks (llama-cpp-python sends one per token); the JSON says which.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from celeris.errors import CelerisError
from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread

PEERS = ("auto", "llama-server", "llama-cpp-python", "none")
# uvicorn's "Uvicorn running on http://127.0.0.1:PORT" and llama-server's "listening on http://127.0.0.1:PORT"
_LISTENING = re.compile(r"(?:Uvicorn running|listening) on https?://[^\s]+:(\d+)")


@dataclass
class ServerProcess:
    """A server subprocess on 127.0.0.1 whose port is read from uvicorn's log; its log tail kept for errors."""

    name: str
    command: list[str]
    health_path: str
    extra_body: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    port: int | None = None
    model_id: str | None = None
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        """Start, wait for the port, then for `health_path` to answer 200, then read the served model's id."""
        env = {k: v for k, v in os.environ.items() if k != "CELERIS_API_KEY"}
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        found = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(found,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            self._check_alive(deadline)
        while True:
            try:
                if httpx.get(self.url + self.health_path, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            self._check_alive(deadline)
            time.sleep(0.2)
        self.model_id = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def _read_log(self, found: threading.Event) -> None:
        for line in self.proc.stderr:  # read to the end, or a full pipe would stall the server
            self.log.append(line.rstrip())
            m = _LISTENING.search(line)
            if m and not found.is_set():
                self.port = int(m.group(1))
                found.set()

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise CelerisError(f"{self.name} exited with status {self.proc.returncode} before answering:\n"
                               + "\n".join(self.log))
        if time.monotonic() > deadline:
            raise CelerisError(f"{self.name} did not answer within the start timeout:\n" + "\n".join(self.log))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        self.proc.stderr.close()


def celeris_server(model: str | None, threads: int, max_batch: int | None, drafter: str, quantize: str,
                   compile: bool = False) -> ServerProcess:
    cmd = [sys.executable, "-m", "celeris", "serve", "--port", "0", "--host", "127.0.0.1", "--threads", str(threads),
           "--drafter", drafter, "--quantize", quantize, "--compile" if compile else "--no-compile"]
    if model:
        cmd += ["--model", model]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    return ServerProcess("celeris", cmd, "/health")


def llama_cpp_python_server(gguf: Path, threads: int, n_ctx: int) -> ServerProcess:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", "0",
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
           "--interrupt_requests", "False"]  # its default: a new request cuts the one streaming
    return ServerProcess("llama-cpp-python", cmd, "/v1/models", extra_body={"repeat_penalty": 1.0})


def llama_server(binary: Path, gguf: Path, threads: int, n_ctx: int, parallel: int) -> ServerProcess:
    # --ctx-size is the KV pool of all slots together (each gets ctx-size / parallel unless --kv-unified)
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", "0", "--threads", str(threads),
           "--threads-batch", str(threads), "--parallel", str(parallel), "--ctx-size", str(n_ctx * parallel),
           "--cont-batching", "--n-gpu-layers", "0"]
    return ServerProcess("llama-server", cmd, "/health")


def find_llama_server() -> Path | None:
    """The binary `make peers` installs beside this Python (the venv's bin), else the first on PATH."""
    beside = Path(sys.executable).with_name("llama-server")
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_cpp_python_server_installed() -> bool:
    """llama-cpp-python and the packages its server imports (the `peers` extra)."""
    return all(importlib.util.find_spec(m) for m in ("llama_cpp", "sse_starlette", "starlette_context",
                                                      "pydantic_settings"))


def llama_server_version(binary: Path) -> str:
    """`llama-server --version`'s line, e.g. "version: 1 (0c1e570)": the llama.cpp commit it was built from."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    lines = (out.stdout + out.stderr).splitlines()
    return next((line.strip() for line in lines if line.startswith("version:")), "unknown")


def choose_peer(asked: str, binary: Path | None, has_llama_cpp_python: bool) -> tuple[str, str]:
    """(peer to run, why) for `--peer asked`; asking for one that is not installed is a CelerisError."""
    if asked == "llama-server" and binary is None:
        raise CelerisError("--peer llama-server: no llama-server binary beside this Python or on PATH; `make peers` "
                           "builds it")
    if asked == "llama-cpp-python" and not has_llama_cpp_python:
        raise CelerisError("--peer llama-cpp-python: llama-cpp-python's server is not installed; "
                           "pip install 'celeris[peers]'")
    if asked != "auto":
        return asked, f"asked for (--peer {asked})"
    if binary is not None:
        return "llama-server", f"the best peer, found at {binary}"
    if has_llama_cpp_python:
        return "llama-cpp-python", ("llama-server not found (`make peers` builds it), so llama-cpp-python's server, "
                                    "which answers one request at a time")
    return "none", "neither llama-server (`make peers`) nor llama-cpp-python's server ('celeris[peers]') is installed"


@dataclass
class RequestResult:
    ttft: float | None = None  # seconds to the first content chunk
    latency: float | None = None  # seconds to the end of the stream
    tokens: int = 0
    counted_by: str = "usage"
    error: str | None = None
    text: str = ""  # the answer's content


def stream_request(client: openai.OpenAI, server: ServerProcess, prompt: str, max_tokens: int,
                   deadline: float) -> RequestResult:
    """One streamed greedy chat completion, timed by the client; cut (error "timeout") past `deadline`."""
    out, parts = RequestResult(), []
    t0 = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=server.extra_body or None)
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    out.ttft = out.ttft or time.perf_counter() - t0
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    out.tokens = chunk.usage.completion_tokens
                if time.monotonic() > deadline:
                    return RequestResult(error="timeout")
    except openai.APIStatusError as exc:
        return RequestResult(error=f"HTTP {exc.status_code}")
    except (openai.APIError, httpx.HTTPError) as exc:
        return RequestResult(error=type(exc).__name__)
    out.latency = time.perf_counter() - t0
    out.text = "".join(parts)
    if not out.tokens:
        out.tokens, out.counted_by = len(parts), "chunks"
    return out


def run_level(server: ServerProcess, prompts: list[str], clients: int, requests: int, max_tokens: int,
              timeout: float) -> dict[str, Any]:
    """`requests` requests from `clients` threads (prompts in order, cycling); figures for this one pass."""
    numbers, lock = itertools.count(), threading.Lock()
    results: list[RequestResult] = []
    deadline = time.monotonic() + timeout

    def client_thread() -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=timeout)
        while time.monotonic() < deadline:
            with lock:
                i = next(numbers)
            if i >= requests:
                break
            r = stream_request(client, server, prompts[i % len(prompts)], max_tokens, deadline)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r.error is None]
    ttft = [r.ttft for r in done if r.ttft is not None]
    latency = [r.latency for r in done]
    return {"wall_s": wall, "completed": len(done), "output_tokens": sum(r.tokens for r in done),
            "tokens_per_s": sum(r.tokens for r in done) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
            "errors": dict(collections.Counter(r.error for r in results if r.error)),
            "tokens_counted_by": sorted({r.counted_by for r in done})}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min–max over repeats of each figure (None where no pass had one)."""
    out: dict[str, Any] = {}
    for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s"):
        vals = [p[key] for p in passes if p[key] is not None]
        out[key] = spread(vals) if vals else None
    errors: collections.Counter = collections.Counter()
    for p in passes:
        errors.update(p["errors"])
    out["errors"] = dict(errors)
    out["completed"] = sum(p["completed"] for p in passes)
    return out


def vs_peer(mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Celeris's output tokens/s over the peer's, pass by pass (the same repeat and level), as a spread; None when
    either has no figure or a pass is missing on one side."""
    if not mine or not theirs or len(mine["runs"]) != len(theirs["runs"]):
        return None
    return ratio(mine, theirs)


def run_serve_benchmark(prompts: list[str], model: str | None = None, gguf: str | Path | None = None,
                        peer: str = "auto", concurrency: tuple[int, ...] = (1, 4, 8), requests: int = 16,
                        max_tokens: int = 128, repeats: int = REPEATS, timeout: float = 300.0, threads: int | None = None,
                        max_batch: int | None = None, drafter: str = "none", quantize: str = "auto",
                        n_ctx: int = 4096, peer_parallel: int = 4, start_timeout: float = 900.0,
                        compile: bool = False, say=print) -> dict[str, Any]:
    """Both servers started, a warm-up pass each (every level, one request per client), then repeats × levels ×
    servers; results as a dict (with Celeris's tokens/s over the peer's, pass by pass, as `vs_peer`).

    `peer`: one of PEERS; `n_ctx`: the peer's context per request; `peer_parallel`: llama-server's slots."""
    import torch

    from celeris.models import default_gguf_path
    from celeris.speculative.bench import default_drafter_dir

    check_repeats(repeats)
    binary = find_llama_server()
    peer, why = choose_peer(peer, binary, llama_cpp_python_server_installed())
    # Both servers at one thread per core unless --threads says otherwise (llama.cpp's documented setting).
    threads = peer_threads = threads or torch.get_num_threads()
    settings = {"model": model or "default", "peer": peer, "concurrency": list(concurrency), "requests": requests,
                "max_tokens": max_tokens, "repeats": repeats, "timeout_s": timeout, "threads": threads,
                "peer_threads": peer_threads,
                "max_batch": max_batch, "drafter": drafter, "quantize": quantize, "compile": compile,
                "prompts": len(prompts),
                "temperature": 0}
    peer_info: dict[str, Any] = {"name": peer, "why": why}
    servers = [celeris_server(model, threads, max_batch, drafter, quantize, compile)]
    peer_note = None
    if peer != "none":
        if gguf is None and model and str(model).endswith(".gguf"):
            gguf = model
        if gguf is None and model:
            peer_note = "not run: --model is not a .gguf file; give the same model's GGUF with --gguf"
        else:
            gguf = Path(gguf) if gguf else default_gguf_path()
            settings.update(gguf=str(gguf), n_ctx=n_ctx)
            if peer == "llama-server":
                settings["peer_parallel"] = peer_parallel
                peer_info["version"] = llama_server_version(binary)
                servers.append(llama_server(binary, gguf, peer_threads, n_ctx, peer_parallel))
            else:
                servers.append(llama_cpp_python_server(gguf, peer_threads, n_ctx))
            peer_info["command"] = servers[-1].command
    try:
        started = []
        for s in servers:
            say(f"starting {s.name}: {' '.join(s.command)}")
            try:
                s.start(start_timeout)
                started.append(s)
                say(f"{s.name} ready on {s.url} (model {s.model_id})")
            except CelerisError as exc:
                if s.name == "celeris":
                    raise
                peer_note = f"could not start: {exc}"
                say(f"the peer {s.name} {peer_note}")
                s.stop()
        for s in list(started):  # a warm-up pass, not timed: one request per client at every level, so the widths
            for c in concurrency:  # and context lengths the timed passes reach have run once (compiled graphs loaded)
                warm = run_level(s, prompts, c, c, max_tokens, timeout)
                if warm["errors"]:
                    break
            if warm["errors"] and s.name == "celeris":
                raise CelerisError(f"celeris's warm-up requests failed: {warm['errors']}\n" + "\n".join(s.log))
            if warm["errors"]:
                peer_note = f"could not answer its warm-up requests: {warm['errors']}"
                say(f"the peer {s.name} {peer_note}")
                started.remove(s)
        passes: dict[str, dict[int, list]] = {s.name: {c: [] for c in concurrency} for s in started}
        for rep in range(repeats):
            for c in concurrency:
                k = rep % len(started)
                for s in started[k:] + started[:k]:
                    p = run_level(s, prompts, c, requests, max_tokens, timeout)
                    passes[s.name][c].append(p)
                    say(f"repeat {rep + 1}/{repeats} {s.name} clients {c}: {p['tokens_per_s']:.1f} tok/s, "
                        f"{p['completed']} done, errors {p['errors'] or 0}")
    finally:
        for s in servers:
            s.stop()
    rows = [{"server": name, "clients": c, **_summary(ps), "passes": ps}
            for name, levels in passes.items() for c, ps in levels.items()]
    if len(passes) == 2:
        for a, b in zip(rows[: len(concurrency)], rows[len(concurrency):], strict=True):
            a["vs_peer"] = vs_peer(a["tokens_per_s"], b["tokens_per_s"])
    peer_info["status"] = peer_note or ("ran" if peer != "none" else "not run")
    artifacts = {"gguf": Path(gguf) if gguf else (None if model else default_gguf_path()), "model": model,
                 "drafter": None if drafter == "none" else default_drafter_dir() if drafter == "default" else drafter}
    return {"environment": environment(artifacts), "settings": settings, "rows": rows, "peer": peer_info}


def format_table(res: dict[str, Any]) -> str:
    def cell(fig: dict | None, scale: float = 1.0, digits: int = 1) -> str:
        return format_spread(fig, digits, scale)

    head = f"{'server':<18}{'clients':>8}  {'output tok/s':<22}{'TTFT p50 ms':<22}{'TTFT p95 ms':<22}" \
           f"{'latency p50 s':<20}{'latency p95 s':<20}{'vs peer':<20}{'done':>5}  errors"
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"{r['server']:<18}{r['clients']:>8}  {cell(r['tokens_per_s']):<22}"
                     f"{cell(r['ttft_p50_s'], 1000, 0):<22}{cell(r['ttft_p95_s'], 1000, 0):<22}"
                     f"{cell(r['latency_p50_s'], 1, 2):<20}{cell(r['latency_p95_s'], 1, 2):<20}"
                     f"{(cell(r['vs_peer'], 1, 2) + '×') if r.get('vs_peer') else '':<20}{r['completed']:>5}  {errors}")
    s = res["settings"]
    lines.append(f"median (min–max) over {s['repeats']} repeats; {s['requests']} requests per level, max_tokens "
                 f"{s['max_tokens']}, greedy, threads: celeris {s['threads']}, peer {s.get('peer_threads', s['threads'])}")
    p = res["peer"]
    version = f" ({p['version']}, --parallel {s['peer_parallel']})" if p.get("version") else ""
    lines.append(f"peer {p['name']}{version}: {p['why']}")
    if p["status"] != "ran":
        lines.append(f"peer {p['name']}: {p['status'].splitlines()[0]}")
    return "\n".join(lines)
