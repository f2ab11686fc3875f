"""`celeris serve` and `celeris bench serve` (registered by `celeris.cli`)."""

from __future__ import annotations

from pathlib import Path

import click
import fastapi  # noqa: F401  (the serve extra: without it `celeris serve` says what to install)
import uvicorn  # noqa: F401

from celeris.serve.server import API_KEY_ENV, DRAIN_SECONDS
from celeris.validate import FiniteFloatRange


@click.command("serve")
@click.option("--model", "-m", default=None, help="Model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
@click.option("--drafter", default="none", show_default=True,
              help="ReDrafter for every request it samples exactly: 'default' (the shipped drafter), a drafter "
                   "directory, or 'none' (plain decoding). With a drafter, requests decode one at a time.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: any free one).")
@click.option("--max-batch", default=None, type=int,
              help="Requests decoded together, joining and leaving between steps (continuous batching); 1 = one at a "
                   "time, with prompt-prefix reuse. Default: 4, or 1 with --drafter (ReDrafter decodes one request "
                   "at a time; --drafter with --max-batch > 1 is refused).")
@click.option("--max-context", default=None, type=int, help="Context limit in tokens, prompt and answer (default: the model's).")
@click.option("--max-queue", default=16, show_default=True, type=int, help="Requests allowed to wait; more get 503.")
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: no key).")
@click.option("--quantize", type=click.Choice(["auto", "int4", "int8", "none"]), default="auto", show_default=True,
              help="The engine's weights, as for `celeris generate`.")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="Compile the decoding step (the first request at each context bucket compiles; cached on disk).")
@click.option("--threads", default=None, type=int,
              help="CPU threads of the model (default: PyTorch's choice, one per core).")
@click.option("--memory", default=None,
              help="KV-memory policy NAME[:PATH] (full, streaming_llm, l2, h2o, random, namm) every request decodes "
                   "under: greedy (a request's temperature must be 0 or left out), one request at a time, with "
                   "--drafter too if given.")
@click.option("--budget", default=None, help="With --memory: fraction in (0, 1], token count, or 'threshold'.  [default: 0.25]")
def serve(model, drafter, host, port, max_batch, max_context, max_queue, api_key, quantize, compile_, threads,
          memory, budget) -> None:
    """Serve a model over the OpenAI API (chat, completions, streaming) with a chat page at /.

    Ctrl-C or SIGTERM stops taking requests and gives in-flight answers a few seconds to finish.
    """
    from celeris.engine import set_threads
    from celeris.serve.server import check_serve_options
    from celeris.serve.server import serve as run

    check_serve_options(drafter, port, max_batch, max_context, api_key, max_queue, memory, budget)
    if threads is not None:
        set_threads(threads)  # checked before loading; `serve` picks the default
    run(model, drafter, host, port, max_batch, max_context, api_key, quantize, compile_, threads, max_queue, DRAIN_SECONDS,
        memory, budget)


@click.command("serve")
@click.option("--model", "-m", default=None, help="Model Celeris serves (default: SmolLM2-135M-Instruct).")
@click.option("--gguf", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The same model as a GGUF file, for the peer (default: the default model's GGUF, or --model "
                   "when it is one).")
# The choices are celeris.serve.bench.PEERS, not imported here: that module loads `openai` (most of a second).
@click.option("--peer", type=click.Choice(["auto", "llama-server", "llama-cpp-python", "none"]), default="auto", show_default=True,
              help="The server run beside Celeris: llama.cpp's `llama-server --parallel N` (built by `make peers`), "
                   "llama-cpp-python's `python -m llama_cpp.server` (pip install 'celeris[peers]'; one request at a "
                   "time), or none. auto: the first of these installed, and the results say why.")
@click.option("--peer-parallel", default=4, show_default=True, type=click.IntRange(1, 256),
              help="llama-server's --parallel (slots decoded together, each with the peer's full context).")
@click.option("--concurrency", default="1,4,8", show_default=True, help="Comma-separated numbers of concurrent clients.")
@click.option("--requests", default=16, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests per concurrency level and repeat, shared among the clients.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1, 4096))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Timed passes per level after the warm-up request; figures are their median with min-max.")
@click.option("--timeout", default=300.0, show_default=True, type=FiniteFloatRange(min=1),
              help="Seconds per level and repeat: no request starts after it, one still streaming is cut (an error).")
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help="CPU threads of both servers (default: PyTorch's choice, one per core, "
                   "for both).")
@click.option("--max-batch", default=None, type=click.IntRange(1, 1024), help="`celeris serve --max-batch` (default: its own).")
@click.option("--drafter", default="none", show_default=True, help="`celeris serve --drafter`.")
@click.option("--quantize", type=click.Choice(["auto", "int4", "int8", "none"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="`celeris serve --compile`: compiled steps, warmed up before the first request (the first run "
                   "compiles, minutes; later runs load inductor's disk cache).")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the results here.")
def bench_serve(model, gguf, peer, peer_parallel, concurrency, requests, max_tokens, repeats, timeout, threads, max_batch,
                drafter, quantize, compile_, json_out) -> None:
    """`celeris serve` under concurrent `openai` clients, a llama.cpp server beside it, loopback only."""
    from celeris.errors import CelerisError
    from celeris.io import check_output_path, save_results
    from celeris.serve.bench import format_table, run_serve_benchmark
    from celeris.speculative.prompts import EVAL_PROMPTS

    try:
        levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
    except ValueError:
        raise CelerisError(f"--concurrency must be comma-separated whole numbers, got {concurrency!r}") from None
    if not levels or any(not 1 <= c <= 256 for c in levels):
        raise CelerisError("--concurrency must list numbers between 1 and 256")
    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    res = run_serve_benchmark(list(EVAL_PROMPTS), model, gguf, peer, levels, requests, max_tokens, repeats, timeout,
                              threads, max_batch, drafter, quantize, peer_parallel=peer_parallel, compile=compile_,
                              say=lambda m: click.echo(m, err=True))
    click.echo(format_table(res))
    if json_out:
        save_results(json_out, res)
        click.echo(f"wrote {json_out}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.commands["bench"].add_command(bench_serve, "serve")
