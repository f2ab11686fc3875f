"""`celeris serve`: an OpenAI-compatible HTTP server over the fast engine, with ReDrafter on request.

    worker = load_worker(model, max_batch=4)              # engine owned by one thread, 4 requests decoded together
    worker = load_worker(model, drafter="default")        # or ReDrafter, one request at a time
    app = create_app(worker, "SmolLM2-135M-Instruct")     # FastAPI: /v1/chat/completions, /v1/completions, ...
    serve(model, port=8000)                               # both, on uvicorn (what the command runs)

Layers: `text` (token ids → text, stop strings), `worker` (the engine's thread, the bounded queue, continuous
batching on `celeris.engine.BatchEngine` or one at a time with prompt-prefix reuse, cancel), `protocol` (OpenAI
request bodies, errors), `app` (routes, server-sent events), `server`. docs/serve.md has the API and the
measurements.
"""

from celeris.serve.app import create_app
from celeris.serve.server import load_worker, serve
from celeris.serve.worker import GenerationRequest, ModelWorker, SamplingParams

__all__ = ["GenerationRequest", "ModelWorker", "SamplingParams", "create_app", "load_worker", "serve"]
