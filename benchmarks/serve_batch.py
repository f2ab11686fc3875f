"""Throughput and latency of `celeris serve` under concurrent clients, one at a time (--max-batch 1) vs batched.

    python benchmarks/serve_batch.py [--model M] [--clients 1 4 8] [--max-batch 1 4] [--requests 16]
                                     [--max-tokens 64] [--repeats 5] [--json OUT]

For each --max-batch, a server in this process on a loopback port (the default model on the default engine,
eager); for each client count C, C threads with the official `openai` client, streaming, send the fixed prompts
round-robin (greedy, `--requests` in all, at most `--max-seconds` per setting). Reported per (max_batch, C):
aggregate output tokens/s (all tokens / wall time), time to first token and request latency p50/p95 as the
clients measure them, errors. Greedy text is also checked against the same prompt's answer at C = 1, so a
batching bug shows up as a mismatch, not as a speed-up. After one warm-up request, --repeats passes over the
client counts; each figure is the median (min-max) of the passes, the JSON keeps every pass and the environment
record. The --max-batch servers run one after the other (one model in memory at a time), so drift between them
is not cancelled the way the passes within one server are; `celeris bench serve --max-batch` is the published
comparison. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import openai
import uvicorn

from celeris.errors import CelerisError
from celeris.io import write_json
from celeris.models import default_gguf_path
from celeris.report import REPEATS, check_repeats, environment, format_spread, spread
from celeris.serve import create_app, load_worker

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
           "List three uses of a paperclip.", "What does a compiler do?", "Name two planets and one moon.",
           "Give me a short tip for writing tests.", "Why is the sky blue?"]
MODEL_ID = "served"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def one_request(client: openai.OpenAI, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"prompt": prompt, "text": "".join(text), "tokens": tokens, "ttft": (first or end) - t0, "latency": end - t0}


def run_clients(url: str, clients: int, requests: int, max_tokens: int, max_seconds: float) -> tuple[list[dict], int, float]:
    """`clients` threads share `requests` requests (prompt i = PROMPTS[i % len]); returns results, errors, wall s."""
    lock, results, errors, next_i = threading.Lock(), [], [0], [0]
    deadline = time.perf_counter() + max_seconds

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=max_seconds)
        while time.perf_counter() < deadline:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= requests:
                return
            try:
                r = one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens)
            except openai.OpenAIError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors[0], time.perf_counter() - t0


def serve_in_thread(worker) -> tuple[str, uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(create_app(worker, MODEL_ID), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quantize", default="auto")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--repeats", type=int, default=REPEATS, help="Timed passes over the client counts after the warm-up.")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    try:
        check_repeats(a.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    env = environment({"model": a.model or default_gguf_path()})
    rows, alone = [], {}
    for max_batch in a.max_batch:
        worker = load_worker(a.model, quantize=a.quantize, max_batch=max_batch)
        url, server, thread = serve_in_thread(worker)
        passes: dict[int, list[dict]] = {c: [] for c in a.clients}
        try:
            one_request(openai.OpenAI(base_url=url + "/v1", api_key="-"), PROMPTS[0], 4)  # warm-up
            for rep in range(a.repeats):
                for clients in a.clients:
                    results, errors, wall = run_clients(url, clients, a.requests, a.max_tokens, a.max_seconds)
                    for r in results:
                        alone.setdefault(r["prompt"], r["text"])  # the first answer seen (C = 1 when listed first)
                    tokens = sum(r["tokens"] for r in results)
                    ttft, lat = [r["ttft"] for r in results], [r["latency"] for r in results]
                    passes[clients].append({
                        "requests": len(results), "errors": errors, "output_tokens": tokens, "seconds": wall,
                        "greedy_mismatches": sum(r["text"] != alone[r["prompt"]] for r in results),
                        "tokens_per_second": tokens / wall if wall > 0 else None,
                        "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
                        "latency_p50": percentile(lat, 0.5), "latency_p95": percentile(lat, 0.95)})
                    print(f"repeat {rep + 1}/{a.repeats} max_batch {max_batch} clients {clients}: {passes[clients][-1]}",
                          flush=True)
        finally:
            server.should_exit = True
            thread.join(30)
        for clients, ps in passes.items():
            row = {"max_batch": max_batch, "clients": clients, "requests": sum(q["requests"] for q in ps),
                   "errors": sum(q["errors"] for q in ps), "greedy_mismatches": sum(q["greedy_mismatches"] for q in ps)}
            for k in ("tokens_per_second", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95"):
                vals = [q[k] for q in ps if q[k] is not None]
                row[k] = spread(vals) if vals else None
            rows.append({**row, "passes": ps})
    print(f"\nmedian (min-max) of {a.repeats} passes after a warm-up request")
    print(f"{'max_batch':>9} {'clients':>7} {'req':>4} {'err':>3} {'diff':>4} {'tok/s':>20} "
          f"{'TTFT p50 s':>20} {'TTFT p95 s':>20} {'lat p50 s':>20} {'lat p95 s':>20}")
    for r in rows:
        f = [format_spread(r[k], 3) for k in ("ttft_p50", "ttft_p95", "latency_p50", "latency_p95")]
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['requests']:>4} {r['errors']:>3} {r['greedy_mismatches']:>4} "
              f"{format_spread(r['tokens_per_second'], 2):>20} {f[0]:>20} {f[1]:>20} {f[2]:>20} {f[3]:>20}")
    if a.json:
        write_json(a.json, {"benchmark": "serve_batch", "environment": env, "model": a.model or "default",
                            "quantize": a.quantize, "max_tokens": a.max_tokens, "repeats": a.repeats, "rows": rows})


if __name__ == "__main__":
    main()
