"""`celeris serve`: an OpenAI-compatible HTTP server over the fast engine, with ReDrafter on request.

    worker = load_worker(model, drafter="default")        # engine (+ drafter) owned by one thread
    app = create_app(worker, "SmolLM2-135M-Instruct")     # FastAPI: /v1/chat/completions, /v1/completions, ...
    serve(model, port=8000)                               # both, on uvicorn (what the command runs)

Layers: `text` (token ids → text, stop strings), `worker` (the engine's thread, the bounded queue, prompt-prefix
reuse, cancel), `protocol` (OpenAI request bodies, errors), `app` (routes, server-sent events), `server`.
One sequence at a time on the batch-1 engine; docs/serve.md has the API and the measurements.
"""

from celeris.serve.app import create_app
from celeris.serve.server import load_worker, serve
from celeris.serve.worker import GenerationRequest, ModelWorker, SamplingParams

__all__ = ["GenerationRequest", "ModelWorker", "SamplingParams", "create_app", "load_worker", "serve"]
