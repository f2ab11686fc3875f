"""Throughput and latency of `celeris serve` under concurrent clients, one at a time (--max-batch 1) vs batched.

    python benchmarks/serve_batch.py [--model M] [--clients 1 4 8] [--max-batch 1 4] [--requests 16]
                                     [--max-tokens 64] [--json OUT]

For each --max-batch, a server in this process on a loopback port (the default model on the default engine,
eager); for each client count C, C threads with the official `openai` client, streaming, send the fixed prompts
round-robin (greedy, `--requests` in all, at most `--max-seconds` per setting). Reported per (max_batch, C):
aggregate output tokens/s (all tokens / wall time), time to first token and request latency p50/p95 as the
clients measure them, errors. Greedy text is also checked against the same prompt's answer at C = 1, so a
batching bug shows up as a mismatch, not as a speed-up. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import openai
import uvicorn

from celeris.io import write_json
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
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows, alone = [], {}
    for max_batch in a.max_batch:
        worker = load_worker(a.model, quantize=a.quantize, max_batch=max_batch)
        url, server, thread = serve_in_thread(worker)
        try:
            one_request(openai.OpenAI(base_url=url + "/v1", api_key="-"), PROMPTS[0], 4)  # warm-up
            for clients in a.clients:
                results, errors, wall = run_clients(url, clients, a.requests, a.max_tokens, a.max_seconds)
                for r in results:
                    alone.setdefault(r["prompt"], r["text"])  # the first answer seen (C = 1 when listed first)
                mismatches = sum(r["text"] != alone[r["prompt"]] for r in results)
                tokens = sum(r["tokens"] for r in results)
                ttft, lat = [r["ttft"] for r in results], [r["latency"] for r in results]
                rows.append({"max_batch": max_batch, "clients": clients, "requests": len(results), "errors": errors,
                             "greedy_mismatches": mismatches, "output_tokens": tokens, "seconds": round(wall, 3),
                             "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
                             "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
                             "latency_p50": percentile(lat, 0.5), "latency_p95": percentile(lat, 0.95)})
                print(rows[-1], flush=True)
        finally:
            server.should_exit = True
            thread.join(30)
    print(f"\n{'max_batch':>9} {'clients':>7} {'req':>4} {'err':>3} {'diff':>4} {'tok/s':>8} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8}")
    for r in rows:
        f = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("ttft_p50", "ttft_p95", "latency_p50", "latency_p95")]
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['requests']:>4} {r['errors']:>3} {r['greedy_mismatches']:>4} "
              f"{r['tokens_per_second'] or 0:>8.2f} {f[0]:>9} {f[1]:>9} {f[2]:>8} {f[3]:>8}")
    if a.json:
        write_json(a.json, {"benchmark": "serve_batch", "model": a.model or "default", "quantize": a.quantize,
                            "max_tokens": a.max_tokens, "rows": rows,
                            "median_tokens_per_second": statistics.median(r["tokens_per_second"] or 0 for r in rows)})


if __name__ == "__main__":
    main()
