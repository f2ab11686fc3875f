"""Soak `celeris serve`: concurrent clients for a while, random hang-ups mid-stream, malformed requests.

    python benchmarks/serve_soak.py [--seconds 300] [--clients 8] [--malformed 0.1] [--disconnect 0.2]
                                    [--model M] [--max-tokens 64] [--seed 0] [--json OUT]

The script starts `celeris serve` itself (a subprocess on an ephemeral 127.0.0.1 port, as `celeris bench
serve` does) and sends one warm-up request. Then each client thread, until `--seconds` have passed, sends
either a malformed request (probability `--malformed`: bad JSON, missing or mistyped fields, bad values,
unsupported fields, an unknown model, an oversized body) or a chat/text completion of a benchmark prompt,
streamed or not, greedy or seeded sampling; a streamed one is cut after a few chunks with probability
`--disconnect`. It reports the count of each HTTP status (and of errors sent inside a 200 stream), whether the
server still answers /health at the end, and its resident memory (RSS, /proc via psutil) after the warm-up and
at the end, sampled every 10 s with the KV cache the server has allocated (/health): the cache grows by context
buckets and is bounded, so flat memory is judged on RSS minus it over the run's second half. Exit status 1 on any 5xx, any error event in a stream, any failed connection or a dead server.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time

import httpx
import psutil

from celeris.io import write_json
from celeris.serve.bench import celeris_server
from celeris.speculative.prompts import evaluation_prompts

# Bodies the server must refuse with a 4xx (each a dict to send as JSON, or raw bytes).
MALFORMED = [
    b"{not json",
    b"",
    b'{"model": "M", "messages": [{"role": "user", "content": "hi"}]',  # truncated
    "\xff\xfe not utf-8".encode("latin-1"),
    {"model": "M"},
    {"model": "M", "messages": "hello"},
    {"model": "M", "messages": [{"role": "user"}]},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    {"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 7},
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "M", "prompt": ["a", 5]},
    {"model": "M", "messages": [{"role": "user", "content": "x" * 2_000_000}]},  # over the body cap
    [1, 2, 3],
]


class Tally:
    """Counts by outcome ('200', '400', 'stream-error 500', 'ConnectError', ...), shared by the client threads."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.disconnects = 0
        self.lock = threading.Lock()

    def add(self, key: str, disconnected: bool = False) -> None:
        with self.lock:
            self.counts[key] += 1
            self.disconnects += disconnected


def malformed(http: httpx.Client, url: str, model: str, rng: random.Random) -> str:
    body = rng.choice(MALFORMED)
    if isinstance(body, bytes):
        r = http.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        if isinstance(body, dict) and body.get("model") == "M":
            body = {**body, "model": model}
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        r = http.post(url + path, json=body)
    return str(r.status_code)


def completion(http: httpx.Client, url: str, model: str, rng: random.Random, prompt: str, max_tokens: int,
               disconnect: float) -> tuple[str, bool]:
    """One well-formed request; (outcome, whether this client hung up mid-stream)."""
    chat = rng.random() < 0.7
    body = {"model": model, "max_tokens": rng.randint(1, max_tokens), "stream": rng.random() < 0.7}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if rng.random() < 0.3:
        body.update(temperature=0.8, top_p=1.0, seed=rng.randint(0, 1000))
    else:
        body["temperature"] = 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not body["stream"]:
        return str(http.post(url + path, json=body).status_code), False
    cut_after = rng.randint(1, 4) if rng.random() < disconnect else None
    with http.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return str(r.status_code), False
        events = 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return f"stream-error {data['error'].get('code')} {data['error'].get('message', '')[:80]}", False
            events += 1
            if cut_after is not None and events >= cut_after:
                return "200", True  # leaving the `with` closes the connection mid-stream
    return "200", False


def client_loop(url: str, model: str, seed: int, deadline: float, args, tally: Tally, prompts: list[str]) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < deadline:
            try:
                if rng.random() < args.malformed:
                    tally.add(malformed(http, url, model, rng))
                else:
                    tally.add(*completion(http, url, model, rng, rng.choice(prompts), args.max_tokens, args.disconnect))
            except httpx.HTTPError as exc:
                tally.add(type(exc).__name__)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class MemorySampler(threading.Thread):
    """Every `every` seconds: the server's RSS and its allocated KV cache (/health), as (seconds, MiB, MiB).

    The KV cache grows by context buckets as longer answers arrive and never shrinks (bounded by
    `--max-batch` × the context limit); RSS minus it is what a leak would make grow."""

    def __init__(self, server, every: float = 10.0):
        super().__init__(daemon=True)
        self.server, self.every, self.samples, self.stopped = server, every, [], threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        try:
            kv = httpx.get(self.server.url + "/health", timeout=10).json().get("kv_cache_bytes", 0) / 2**20
            self.samples.append((round(time.monotonic() - self.t0, 1), round(rss_mib(self.server.proc.pid), 1),
                                 round(kv, 1)))
        except (httpx.HTTPError, psutil.Error):
            pass

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()


def steady_growth(samples: list[tuple[float, float, float]]) -> dict[str, float] | None:
    """RSS minus KV cache over the second half of the run: growth (last minus first sample of that half) and its
    least-squares slope in MiB per minute. Flat memory: both near 0."""
    half = [s for s in samples if s[0] >= samples[-1][0] / 2] if samples else []
    if len(half) < 3:
        return None
    t = [s[0] / 60 for s in half]
    y = [s[1] - s[2] for s in half]
    tm, ym = sum(t) / len(t), sum(y) / len(y)
    slope = sum((a - tm) * (b - ym) for a, b in zip(t, y, strict=True)) / sum((a - tm) ** 2 for a in t)
    return {"from_s": half[0][0], "to_s": half[-1][0], "rss_minus_kv_mib_start": round(y[0], 1),
            "rss_minus_kv_mib_end": round(y[-1], 1), "growth_mib": round(y[-1] - y[0], 1),
            "slope_mib_per_min": round(slope, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--malformed", type=float, default=0.1, help="Share of requests that are malformed.")
    p.add_argument("--disconnect", type=float, default=0.2, help="Share of streamed requests cut after 1-4 chunks.")
    p.add_argument("--model", default=None, help="`celeris serve --model` (default: the default model).")
    p.add_argument("--max-tokens", type=int, default=64, help="Each request asks for 1..this many tokens.")
    p.add_argument("--threads", type=int, default=None, help="`celeris serve --threads` (default: PyTorch's).")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--drafter", default="none", help="`celeris serve --drafter` (default: none).")
    p.add_argument("--quantize", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="`celeris serve --compile` (default) or --no-compile.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    server = celeris_server(args.model, args.threads or torch.get_num_threads(), args.max_batch, args.drafter, args.quantize,
                            args.compile)
    server.start(timeout=900)
    prompts = evaluation_prompts()
    try:
        http = httpx.Client(timeout=120)
        warm = http.post(server.url + "/v1/chat/completions", json={
            "model": server.model_id, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 8})
        warm.raise_for_status()
        rss_start = rss_mib(server.proc.pid)
        print(f"server pid {server.proc.pid} on {server.url}, RSS {rss_start:.1f} MiB after warm-up; "
              f"{args.clients} clients for {args.seconds:g} s", flush=True)
        tally, deadline = Tally(), time.monotonic() + args.seconds
        sampler = MemorySampler(server)
        sampler.sample()
        sampler.start()
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(server.url, server.model_id, args.seed * 1000 + i, deadline, args, tally, prompts))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sampler.stopped.set()
        sampler.join()
        alive = server.proc.poll() is None
        if alive:
            sampler.sample()
        try:
            health = http.get(server.url + "/health", timeout=10).json() if alive else None
        except httpx.HTTPError:
            health = None
        rss_end = rss_mib(server.proc.pid) if alive else None
    finally:
        server.stop()
    failures = {k: v for k, v in tally.counts.items() if not k[0].isdigit() or k.startswith("5")}
    ok = alive and health is not None and health.get("status") == "ok" and not failures
    print(f"\n{'outcome':<60}{'count':>8}")
    for key, n in sorted(tally.counts.items()):
        print(f"{key:<60}{n:>8}")
    print(f"requests {sum(tally.counts.values())}, streams cut by the client {tally.disconnects}")
    print(f"server alive at the end: {alive}; /health: {health}")
    print(f"server RSS: {rss_start:.1f} MiB after warm-up, " + (f"{rss_end:.1f} MiB at the end" if rss_end else "-"))
    steady = steady_growth(sampler.samples)
    if sampler.samples:
        first, last = sampler.samples[0], sampler.samples[-1]
        print(f"KV cache allocated: {first[2]:.1f} MiB at the start, {last[2]:.1f} MiB at the end "
              f"(grows by context buckets, bounded)")
    if steady:
        print(f"RSS minus KV cache over the second half ({steady['from_s']:g}-{steady['to_s']:g} s): "
              f"{steady['rss_minus_kv_mib_start']:.1f} -> {steady['rss_minus_kv_mib_end']:.1f} MiB, "
              f"slope {steady['slope_mib_per_min']:+.2f} MiB/min")
    print("PASS" if ok else f"FAIL: {failures or 'the server is not healthy'}")
    if args.json:
        from celeris.report import environment

        write_json(args.json, {"environment": environment(), "settings": vars(args), "counts": dict(tally.counts),
                               "client_disconnects": tally.disconnects, "alive": alive, "health": health,
                               "rss_mib_start": rss_start, "rss_mib_end": rss_end,
                               "memory_samples": [{"s": a, "rss_mib": b, "kv_cache_mib": c} for a, b, c in sampler.samples],
                               "steady_state": steady, "pass": ok})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
