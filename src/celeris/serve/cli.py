"""`celeris serve` (registered by `celeris.cli`)."""

from __future__ import annotations

import click
import fastapi  # noqa: F401  (the serve extra: without it `celeris serve` says what to install)
import uvicorn  # noqa: F401

from celeris.serve.server import API_KEY_ENV, DRAIN_SECONDS


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
@click.option("--threads", default=None, type=int, help="CPU threads (default: PyTorch's choice).")
def serve(model, drafter, host, port, max_batch, max_context, max_queue, api_key, quantize, compile_, threads) -> None:
    """Serve a model over the OpenAI API (chat, completions, streaming) with a chat page at /.

    Ctrl-C or SIGTERM stops taking requests and gives in-flight answers a few seconds to finish.
    """
    from celeris.engine import set_threads
    from celeris.serve.server import check_serve_options
    from celeris.serve.server import serve as run

    check_serve_options(drafter, port, max_batch, max_context, api_key, max_queue)
    set_threads(threads)
    run(model, drafter, host, port, max_batch, max_context, api_key, quantize, compile_, threads, max_queue, DRAIN_SECONDS)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
