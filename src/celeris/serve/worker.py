"""The model worker: one thread owns the engine (`run()` on the caller's, as `celeris serve` does on its main
thread, or `start()` on its own); requests wait in a bounded queue and stream text back.

    worker = ModelWorker(engine, drafter=None, max_queue=16).start()
    req = GenerationRequest(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    worker.submit(req)                   # WorkerBusy when max_queue requests are already waiting
    async for event in req:              # Delta(text, tokens) ..., then Finished(reason, ...) or Failed(...)
        ...
    req.cancel()                         # a client gone: the worker drops it before its next target step

The asyncio event loop never runs the model: it only puts requests in the queue and reads their events.
Each request samples from its own `torch.Generator` seeded from its `seed`, so a seeded request gives the
same text whatever ran before it or beside it.

max_batch 1: one sequence at a time on the batch-1 engine. The previous sequence's K/V stay in the engine: a
prompt that starts with the same token ids (a conversation's next turn) prefills only the rest
(`Engine.extend`), as llama-server's prompt cache does. With a drafter, ReDrafter decodes each request.

max_batch N > 1: continuous batching on a `BatchEngine` of N rows. Between two decoding steps, cancelled and
finished requests leave (their row is freed) and waiting requests join (their prompt prefills alone into a
free row, then their first token is sampled); each step then decodes one token for every row in use. No
prompt-prefix reuse for requests that join a batch (their prompt prefills in full).

With a drafter and max_batch N > 1, drafting is for a request that is alone: one that arrives to an idle
worker with nobody waiting is decoded by ReDrafter on the batch-1 engine (prefix reuse included) until it
ends or another request arrives; then its committed K/V move into a row of the batch engine
(`BatchEngine.adopt`) and it goes on batched with the newcomers. A drafting step pays off when one sequence
leaves the cores idle between weight reads; several sequences fill them by batching instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from celeris.engine import BatchEngine
from celeris.errors import CelerisError
from celeris.generation import eos_token_ids, sample_next, sampling_loop
from celeris.serve.text import TextStream

log = logging.getLogger("celeris.serve")


@dataclass
class SamplingParams:
    """What one request asks of the decoder. temperature 0 = greedy; `seed` None = a fresh random seed."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    """New text for the client (possibly '' when only held-back text advanced) and the answer's tokens so far."""

    text: str
    tokens: int


@dataclass
class Finished:
    """The end of an answer. reason: 'stop' (EOS or a stop string), 'length' (max_tokens) or 'cancelled'."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose K/V were reused from the sequence before
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failed:
    """The request could not be answered; `status` is the HTTP status it maps to."""

    message: str
    status: int = 400


class WorkerBusy(Exception):
    """The bounded queue is full, or the worker is shutting down."""


class GenerationRequest:
    """One request's life on the worker: prompt ids, sampling, a cancel flag, and the events sent back.

    Created on the event loop (events arrive through an `asyncio.Queue`, iterate with `async for`), or with
    `sync=True` anywhere (a thread-safe queue, iterate with `for event in req.iter_events()`)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sync: bool = False):
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._loop = None if sync else asyncio.get_running_loop()
        self._events: asyncio.Queue | queue.Queue = asyncio.Queue() if self._loop else queue.Queue()
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.done = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, event: Delta | Finished | Failed) -> None:
        """Called on the model's thread."""
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shut down): nobody is listening
            self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta | Finished | Failed:
        if self.done:
            raise StopAsyncIteration
        event = await self._events.get()
        self.done = not isinstance(event, Delta)
        return event

    def iter_events(self):
        while not self.done:
            event = self._events.get()
            self.done = not isinstance(event, Delta)
            yield event


class _Stop(Exception):
    """Raised from the decoder's callbacks once the answer is complete (or cancelled): ends decoding there."""


class _Migrate(Exception):
    """Raised from a drafting request's callback when another request waits: it goes on in the batch engine."""


class _Answer:
    """The tokens of one answer as the decoder commits them: text with stop strings, the budget, EOS, cancel."""

    def __init__(self, req: GenerationRequest, tokenizer, eos_ids: list[int], budget: int):
        self.req, self.eos, self.budget = req, set(eos_ids), budget
        self.text = TextStream(tokenizer, req.params.stop)
        self.raw: list[int] = []  # every token the decoder produced, in order (some may follow the end)
        self.tokens = 0  # tokens of the answer
        self.reason: str | None = None
        self.first_token_at: float | None = None

    def take(self, ids: list[int]) -> None:
        self.raw += ids
        if self.req.cancelled:
            self.end("cancelled")
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        out = []
        for t in ids:
            self.tokens += 1
            out.append(self.text.push(t))
            if self.text.stopped or t in self.eos:
                self.reason = "stop"
            elif self.tokens >= self.budget:
                self.reason = "length"
            if self.reason:
                break
        if self.reason and not self.text.stopped:
            out.append(self.text.flush())
        if "".join(out) or self.reason is None:
            self.req.send(Delta("".join(out), self.tokens))
        if self.reason:
            raise _Stop

    def end(self, reason: str) -> None:
        self.reason = reason
        raise _Stop


@dataclass
class _Row:
    """A request decoding in a row of the batch engine: its answer, generator, and the token to feed next."""

    req: GenerationRequest
    answer: _Answer
    generator: torch.Generator
    started: float
    token: int = 0
    steps: int = 1  # target forwards: its prefill, then one per batched step it took part in
    decoder: str = "plain"


class ModelWorker:
    """Owns `engine` (a batch-1 `celeris.engine.Engine`) on one thread; serves `GenerationRequest`s.

    drafter: a `RecurrentDrafter` loaded for this engine, or None. With one, requests are decoded by ReDrafter
    (`redrafter_engine_decode`: greedy identical to plain decoding, sampling exact, top_p included). max_batch > 1
    decodes up to that many requests together on a `BatchEngine` over the same model (continuous batching); a
    drafter then decodes a request while it is the only one (module docstring).
    memory: (policy NAME[:PATH], budget) of a KV-memory policy that every request decodes under (greedily, one at
    a time, with the drafter when there is one: `celeris.compose.redrafter_with_memory`).
    """

    def __init__(self, engine, drafter=None, max_queue: int = 16, prefix_cache: bool = True,
                 beam_width: int = 1, beam_length: int = 4, max_batch: int = 1,
                 memory: tuple[str, str] | None = None):
        if max_queue < 1:
            raise CelerisError(f"the request queue must hold at least 1 request, got {max_queue}")
        if max_batch < 1:
            raise CelerisError(f"--max-batch must be at least 1, got {max_batch}")
        if max_batch > 1 and memory is not None:
            raise CelerisError(f"--max-batch {max_batch} with --memory: requests under a memory policy decode one at "
                               "a time; use --max-batch 1")
        self.engine, self.tokenizer, self.drafter, self.memory = engine, engine.tokenizer, drafter, memory
        self.max_batch = max_batch
        self.batch = (BatchEngine(engine.model, engine.tokenizer, max_batch, engine.max_len, engine.info.compiled,
                                  replace(engine.info), progress=engine.progress) if max_batch > 1 else None)
        self.rows: dict[int, _Row] = {}  # the requests decoding in the batch engine, by row
        self.eos_ids = eos_token_ids(engine.model, engine.tokenizer)
        self.prefix_cache, self.beam_width, self.beam_length = prefix_cache, beam_width, beam_length
        self.queue: queue.Queue[GenerationRequest | None] = queue.Queue(maxsize=max_queue)
        self.cached: list[int] = []  # the token ids whose K/V are in the engine's slots 0..len-1
        self.current: GenerationRequest | None = None
        self.served = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="celeris-model-worker", daemon=True)
        self.runs_on_caller = False  # True: `run()` decodes on the calling thread (set it before the app starts)
        self._ended = threading.Event()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Before serving: compile the steps the first requests run (every batch width, or one token, at the first
        cache bucket) and, with a drafter, time the adaptive draft length's verify costs (compiling each length).
        Eager, only the drafter's costs are measured. Leaves no committed slot."""
        if self.batch is not None:
            if self.batch.info.compiled:
                self.batch.warm_up()
            if self.drafter is None:
                return
        if self.drafter is not None and self.beam_width == 1:
            from celeris.speculative.engine_decoding import engine_step_costs

            engine_step_costs(self.engine, self.drafter, self.beam_length)
        elif self.engine.info.compiled:
            self.engine.verify_step(torch.zeros(1, 1, dtype=torch.long))
        self.engine.filled, self.cached = 0, []

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache allocated now (every row; it grows by context buckets as answers need, never shrinks)."""
        return (self.batch if self.batch is not None else self.engine).kv_bytes

    @property
    def max_context(self) -> int:
        return self.engine.max_len

    def start(self) -> ModelWorker:
        """Start the thread (once; a second call does nothing, and so does a call while `run()` decodes)."""
        if self._thread.ident is None and not self.runs_on_caller:
            self._thread.start()
        return self

    def run(self) -> None:
        """Decode on the calling thread until `stop()` (from another thread); `start()` is then a no-op.

        `celeris serve` decodes on the main thread, the one that loaded the model, and runs the HTTP server beside
        it: the OpenMP runtime (libgomp) keeps a thread team per thread that ran a parallel region, and once it
        manages more threads than there are cores it stops spinning at its barriers and sleeps instead. A model
        loaded on one thread and stepped on another crosses that line, and its steps ran at half speed here."""
        self.runs_on_caller = True
        try:
            self._loop()
        finally:
            self._ended.set()

    @property
    def alive(self) -> bool:
        running = self._thread.is_alive() or (self.runs_on_caller and not self._ended.is_set())
        return running and not self._stopping

    @property
    def running(self) -> list[GenerationRequest]:
        """The requests being decoded now."""
        rows = [r.req for r in list(self.rows.values())]
        return rows + ([self.current] if self.current is not None else [])

    def submit(self, req: GenerationRequest) -> None:
        if self._stopping:
            raise WorkerBusy("the server is shutting down")
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise WorkerBusy(f"the server is busy: {self.queue.maxsize} requests are already waiting") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new requests, cancel the waiting ones, let the running one end within a step, join."""
        self._stopping = True
        while True:
            try:
                req = self.queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.send(Failed("the server is shutting down", 503))
        for req in self.running:
            req.cancel()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self.runs_on_caller:
            self._ended.wait(timeout)

    # ---- the model's thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.batch is not None:
            self._batch_loop()
            return
        while not self._stopping:
            req = self.queue.get()
            if req is None:
                break
            self._serve_guarded(req)

    def reusable_prefix(self, prompt: list[int]) -> int:
        """Prompt tokens whose K/V the engine already holds (at most all but the last, which must run for logits)."""
        if not self.prefix_cache:
            return 0
        n = 0
        for a, b in zip(self.cached, prompt[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    def uses_drafter(self, params: SamplingParams, prompt_tokens: int) -> bool:
        """ReDrafter decodes a request when there is a drafter and its verify tree fits the context to the last token
        (else plain decoding, same law)."""
        return (self.drafter is not None
                and prompt_tokens + params.max_tokens + self.beam_width * self.beam_length <= self.engine.max_len)

    @torch.inference_mode()
    def _serve(self, req: GenerationRequest, migrate: bool = False) -> None:
        """Decode `req` on the batch-1 engine. `migrate` (a drafting request of a batching worker): when another
        request is waiting after a drafting step, the request moves to a row of the batch engine (`_migrate`)."""
        p, engine = req.params, self.engine
        T = len(req.prompt_ids)
        if req.cancelled:
            req.send(Finished("cancelled", T, 0, 0))
            return
        started = time.perf_counter()
        start = self.reusable_prefix(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        gen = torch.Generator(device=engine.device)
        gen.manual_seed(req.seed)
        budget = min(p.max_tokens, engine.max_len - T + 1)
        answer = _Answer(req, self.tokenizer, self.eos_ids, budget)
        drafting = self.uses_drafter(p, T)
        steps = 1  # target forwards: the prefill, then one per decode or verify step
        spec = None
        if self.memory is not None:
            return self._serve_under_memory(req, ids, budget, answer, started)
        try:
            if drafting:
                from celeris.speculative import SpeculativeStats
                from celeris.speculative.engine_decoding import redrafter_engine_decode

                spec = SpeculativeStats()
                take = answer.take
                if migrate:
                    def take(ids: list[int]) -> None:
                        answer.take(ids)
                        if not self.queue.empty():  # another request waits: go on batched with it
                            raise _Migrate

                redrafter_engine_decode(engine, self.drafter, ids, budget, self.beam_width, self.beam_length,
                                        p.temperature, self.eos_ids, gen, spec, cached=start, on_commit=take,
                                        top_p=p.top_p, adaptive=self.beam_width == 1)
            else:
                _, logits = engine.extend(ids, start) if start else engine.prefill(ids)

                def step(tok: torch.Tensor) -> torch.Tensor:
                    nonlocal steps
                    answer.take([int(tok)])
                    steps += 1
                    return engine.decode_step(tok)

                new = sampling_loop(logits, step, budget, p.temperature, self.eos_ids, gen, p.top_p)
                answer.take([int(new[-1])])
            answer.end("length")  # the decoder stopped at its own budget without the answer saying so
        except _Stop:
            pass
        except _Migrate:  # (the finally below records the engine's slots for prefix reuse)
            self._migrate(req, answer, gen, started, 1 + spec.steps)
            return
        except CelerisError as exc:  # raised before the engine's slots changed: the bookkeeping below holds
            req.send(Failed(str(exc), 400))
            return
        finally:
            # the slots hold the prompt, then the tokens the decoder fed back, which are the first ones it produced
            self.cached = (req.prompt_ids + answer.raw)[: engine.filled]
        if spec is not None:
            steps = 1 + spec.steps
        stats = _stats(answer, started, steps, "redrafter" if drafting else "plain", engine.kv_bytes, engine.filled)
        req.send(Finished(answer.reason or "length", T, answer.tokens, start, stats))

    def _serve_under_memory(self, req: GenerationRequest, ids: torch.Tensor, budget: int, answer: _Answer,
                            started: float) -> None:
        """Greedy decoding under the server's memory policy (with ReDrafter when there is a drafter). The policy
        starts the engine's cache afresh, so no prefix is reused, before or after."""
        from celeris.memory import make_policy, parse_budget, run_with_memory

        name, budget_spec = self.memory
        policy, b = make_policy(name), parse_budget(budget_spec)
        res = spec = None
        self.cached = []
        try:
            if self.drafter is not None:
                from celeris.compose import redrafter_with_memory
                from celeris.speculative import SpeculativeStats

                spec = SpeculativeStats()
                res = redrafter_with_memory(self.engine, self.drafter, ids, policy, b, budget, self.beam_length,
                                            eos_ids=self.eos_ids, stats=spec, on_commit=answer.take)
            else:
                res = run_with_memory(self.engine, ids, policy, b, max_new_tokens=budget, eos_ids=self.eos_ids,
                                      on_commit=answer.take)
            answer.end("length")
        except _Stop:
            pass
        except CelerisError as exc:
            req.send(Failed(str(exc), 400))
            return
        steps = 1 + (spec.steps if spec is not None else max(0, answer.tokens - 1))
        decoder = ("redrafter" if spec is not None else "plain") + f"+memory:{policy.name}"
        stats = _stats(answer, started, steps, decoder, self.engine.kv_bytes, self.engine.filled)
        stats["memory"] = {"policy": policy.name, "budget": str(b) if b else "threshold"}
        if res is not None:  # the decoder ran to its own end (not cut by a stop string, the length or a cancel)
            stats["memory"]["evictions"] = res.evictions
        req.send(Finished(answer.reason or "length", len(req.prompt_ids), answer.tokens, 0, stats))

    # ---- continuous batching (max_batch > 1) --------------------------------------------------------
    def _batch_loop(self) -> None:
        """Between steps: requests leave (cancelled or done) and join (prefill into a free row); then one step.
        With a drafter, a request that arrives alone is drafted on the batch-1 engine first (`_serve_guarded`)."""
        while True:
            for row, r in list(self.rows.items()):
                if r.req.cancelled:
                    self._leave(row, "cancelled")
            while not self._stopping and self.batch.free_row() is not None:
                try:
                    req = self.queue.get(block=not self.rows)  # idle: wait for work; busy: only what is waiting
                except queue.Empty:
                    break
                if req is None:
                    break
                if (not self.rows and self.drafter is not None and self.queue.empty()
                        and self.uses_drafter(req.params, len(req.prompt_ids))):
                    self._serve_guarded(req, migrate=True)
                else:
                    self._join(req)
            if self._stopping and not self.rows:
                break
            if self.rows:
                self._batch_step()

    def _serve_guarded(self, req: GenerationRequest, migrate: bool = False) -> None:
        """`_serve` on the batch-1 engine; an error fails this request only. With `migrate` (a batching worker's
        lone drafting request) it may end up in a batch row instead, counted as served when it leaves there."""
        self.current = req
        try:
            self._serve(req, migrate)
        except Exception as exc:  # the worker never dies: the request fails, the next one is served
            log.exception("request failed")
            self.cached = []
            req.send(Failed(f"internal error: {type(exc).__name__}: {exc}", 500))
        finally:
            self.current = None
        if not any(r.req is req for r in self.rows.values()):
            self.served += 1

    def _migrate(self, req: GenerationRequest, answer: _Answer, gen: torch.Generator, started: float,
                 steps: int) -> None:
        """Move a drafting request into a free row: its committed K/V are the prompt and every answer token but the
        last, which is the row's next input."""
        if self.engine.filled != len(req.prompt_ids) + len(answer.raw) - 1:
            raise CelerisError(f"internal: {self.engine.filled} committed slots for a {len(req.prompt_ids)}-token "
                               f"prompt and {len(answer.raw)} answer tokens")
        row = self.batch.free_row()
        self.batch.adopt(row, self.engine)
        self.rows[row] = _Row(req, answer, gen, started, token=answer.raw[-1], steps=steps,
                              decoder="redrafter, then batched")

    def _join(self, req: GenerationRequest) -> None:
        T = len(req.prompt_ids)
        if req.cancelled:
            req.send(Finished("cancelled", T, 0, 0))
            self.served += 1
            return
        started = time.perf_counter()
        p, row = req.params, self.batch.free_row()
        gen = torch.Generator(device=self.batch.device)
        gen.manual_seed(req.seed)
        r = _Row(req, _Answer(req, self.tokenizer, self.eos_ids, min(p.max_tokens, self.batch.max_len - T + 1)),
                 gen, started)
        try:
            with torch.inference_mode():
                logits = self.batch.prefill(row, torch.tensor([req.prompt_ids], dtype=torch.long))
                token = int(sample_next(logits, p.temperature, gen, p.top_p)[0])
        except CelerisError as exc:  # refused before the row was taken
            req.send(Failed(str(exc), 400))
            self.served += 1
            return
        except Exception as exc:
            log.exception("request failed")
            self.batch.release(row)
            req.send(Failed(f"internal error: {type(exc).__name__}: {exc}", 500))
            self.served += 1
            return
        self.rows[row] = r
        self._take(row, token)

    @torch.inference_mode()
    def _batch_step(self) -> None:
        """One token for every row in use; each row samples from its own generator (greedy rows: argmax)."""
        try:
            tokens = torch.zeros(self.batch.width, dtype=torch.long)
            for row, r in self.rows.items():
                tokens[row] = r.token
            logits = self.batch.decode_step(tokens)
            nxt = logits.argmax(dim=-1)
            for row, r in self.rows.items():
                p = r.req.params
                if p.temperature > 0:
                    nxt[row] = sample_next(logits[row : row + 1], p.temperature, r.generator, p.top_p)[0]
        except Exception as exc:  # the worker never dies: every request in the step fails, the rows are freed
            log.exception("batched step failed")
            for row, r in list(self.rows.items()):
                self.batch.release(row)
                del self.rows[row]
                r.req.send(Failed(f"internal error: {type(exc).__name__}: {exc}", 500))
                self.served += 1
            return
        ids = nxt.tolist()
        for row, r in list(self.rows.items()):
            r.steps += 1
            self._take(row, ids[row])

    def _take(self, row: int, token: int) -> None:
        """Hand a row's new token to its answer; the row leaves when the answer is complete."""
        r = self.rows[row]
        try:
            r.answer.take([token])
            r.token = token
        except _Stop:
            self._leave(row, r.answer.reason)
        except Exception as exc:  # the worker never dies: this request fails, its row is freed
            log.exception("request failed")
            del self.rows[row]
            self.batch.release(row)
            r.req.send(Failed(f"internal error: {type(exc).__name__}: {exc}", 500))
            self.served += 1

    def _leave(self, row: int, reason: str | None) -> None:
        r = self.rows.pop(row)
        kv_tokens = self.batch.filled[row]
        self.batch.release(row)
        stats = _stats(r.answer, r.started, r.steps, r.decoder, self.batch.kv_bytes, kv_tokens)
        stats["batch_rows"] = self.max_batch
        r.req.send(Finished(reason or "length", len(r.req.prompt_ids), r.answer.tokens, 0, stats))
        self.served += 1


def _stats(answer: _Answer, started: float, steps: int, decoder: str, kv_bytes: int, kv_tokens: int) -> dict[str, Any]:
    """The `celeris` field of a finished answer."""
    req, now = answer.req, time.perf_counter()
    first = answer.first_token_at or now
    return {
        "decoder": decoder,
        "target_steps": steps,
        "tokens_per_target_step": round(answer.tokens / steps, 3),
        "kv_bytes": kv_bytes,
        "kv_tokens": kv_tokens,
        "queue_seconds": round(started - req.submitted, 4),
        "time_to_first_token_seconds": round(first - req.submitted, 4),
        "decode_tokens_per_second": (round((answer.tokens - 1) / (now - first), 2)
                                     if answer.tokens > 1 and now > first else None),
    }
