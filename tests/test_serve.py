"""`celeris serve` driven by the official `openai` client, against a tiny random model on a loopback port.

The module's server (uvicorn in a thread, ephemeral port, an API key) serves a 2-layer random Llama whose
greedy output varies token by token (`context_llama`'s wide initialisation) with a byte-level BPE
tokenizer trained here, so answers hold multi-byte characters and multi-character tokens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from celeris import generate  # `celeris generate`'s Python API
from celeris.cli import main
from celeris.engine import load_engine
from celeris.generation import engine_decode, top_p_filter
from celeris.lm import train_tokenizer
from celeris.models import new_model
from celeris.serve import ModelWorker, SamplingParams, create_app
from celeris.serve.protocol import chat_prompt_ids
from celeris.serve.text import TextStream
from celeris.serve.worker import Delta, GenerationRequest, WorkerBusy

KEY = "sk-celeris-test"
MODEL = "tiny-chat"
CONTEXT = 256
BODY_CAP = 16_384
TEXTS = ["def f(x):\n    return x + 1\n" * 20, "hello world, hello tokens. Café crème, 5 € — naïve façade.\n" * 20,
         "The quick brown fox jumps over the lazy dog; 日本語のテキスト。\n" * 10]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
QUESTION = "hello world, tell me about the quick brown fox"


def make_tiny_dir(path: Path, context: int = 512) -> Path:
    """A random-weight 2-layer Llama (wide init: greedy output depends on every token) with a trained
    byte-level BPE tokenizer and a chat template, saved as a model directory."""
    tok = train_tokenizer(TEXTS, vocab_size=400)
    tok.chat_template = CHAT_TEMPLATE
    model = new_model("nano", vocab_size=len(tok), max_position_embeddings=context, seed=1, initializer_range=0.3)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def start_server(app) -> tuple[str, threading.Thread, object]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", thread, server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    worker = ModelWorker(engine, max_queue=4)
    url, thread, srv = start_server(create_app(worker, MODEL, api_key=KEY, max_body_bytes=BODY_CAP))
    yield SimpleNamespace(url=url, worker=worker, engine=engine, tokenizer=engine.tokenizer, dir=tiny_dir)
    srv.should_exit = True
    thread.join(10)
    torch.set_num_threads(threads)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """A second engine on the same model, never touched by the server: `celeris.generation` on it is the reference."""
    return load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)


def chat(client, content: str = QUESTION, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


# ---- the API through the official client --------------------------------------------------------------

def test_models_lists_the_served_model_with_its_context(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["celeris"]["max_context"] == CONTEXT
    assert client.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["fresh prefill", "prefix reused"])
def test_greedy_chat_over_http_equals_celeris_generate_token_for_token(server, client, reference, monkeypatch,
                                                                       prefix_cache):
    monkeypatch.setattr(server.worker, "prefix_cache", prefix_cache)
    ref = generate(reference, reference.tokenizer, QUESTION, max_new_tokens=40, temperature=0.0, chat=True)
    assert len(set(ref.token_ids)) >= 15 and ref.new_tokens == 40  # a reference that would show a wrong token
    chat(client, max_tokens=3, temperature=0)  # leaves this very prompt in the engine's cache
    r = chat(client, max_tokens=40, temperature=0)
    prompt = chat_prompt_ids(server.tokenizer, [{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 40)
    assert server.worker.cached == prompt + ref.token_ids[:-1]  # the engine's slots: prompt, then every token fed back
    assert r.usage.prompt_tokens_details.cached_tokens == (len(prompt) - 1 if prefix_cache else 0)
    extra = r.model_extra["celeris"]
    assert extra["decoder"] == "plain" and extra["tokens_per_target_step"] == 1.0 and extra["kv_bytes"] > 0


def test_text_completion_greedy_equals_celeris_generate(client, reference):
    ref = generate(reference, reference.tokenizer, "The quick brown", max_new_tokens=30, temperature=0.0, chat=False)
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=30, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == ref.new_tokens
    ids = client.completions.create(model=MODEL, prompt=reference.tokenizer("The quick brown")["input_ids"],
                                    max_tokens=30, temperature=0)
    assert ids.choices[0].text == ref.text  # a prompt of token ids is the same prompt


def test_a_conversations_next_turn_reuses_the_cached_prefix_and_still_equals_a_fresh_decode(server, client, reference):
    first = chat(client, max_tokens=12, temperature=0)
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and the lazy dog?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    ids = chat_prompt_ids(reference.tokenizer, messages)
    ref = engine_decode(reference, torch.tensor([ids]), 24)
    assert r.choices[0].message.content == reference.tokenizer.decode(ref.tolist(), skip_special_tokens=True)
    cached = r.usage.prompt_tokens_details.cached_tokens
    first_prompt = chat_prompt_ids(reference.tokenizer, messages[:1])
    assert len(first_prompt) < cached < len(ids)  # the first turn's prompt and part of its answer were not run again


def test_extend_keeps_the_cached_prefix_and_gives_prefill_logits(reference):
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    _, full = reference.prefill(ids)
    reference.prefill(ids[:, :25])
    _, tail = reference.extend(ids, 25)
    assert reference.filled == 40
    torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-4)


def test_streaming_chat_sends_the_same_text_in_chunks_and_usage_last(client):
    whole = chat(client, max_tokens=30, temperature=0).choices[0].message.content
    chunks = list(chat(client, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    plain = list(chat(client, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices  # no usage chunk unless asked


def test_streamed_text_completion(client):
    whole = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == 20


def test_the_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_seeded_sampling_is_reproducible_whatever_ran_before(client):
    def sample(seed, **kw):
        return chat(client, max_tokens=30, temperature=1.0, seed=seed, **kw).choices[0].message.content

    a = sample(7)
    chat(client, "something else entirely", max_tokens=9, temperature=1.0)  # other requests, unseeded, in between
    assert sample(7) == a
    assert sample(8) != a
    assert sample(7, top_p=0.9) == sample(7, top_p=0.9) != sample(7, top_p=0.05)
    assert sample(7, top_p=0.0) == chat(client, max_tokens=30, temperature=0).choices[0].message.content  # nucleus of one


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    p = torch.tensor([[0.5, 0.15, 0.3, 0.05]])
    assert torch.equal(top_p_filter(p, 0.5), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(p, 0.6), torch.tensor([[0.5, 0.0, 0.3, 0.0]]))
    assert torch.equal(top_p_filter(p, 0.9), torch.tensor([[0.5, 0.15, 0.3, 0.0]]))
    assert torch.equal(top_p_filter(p, 0.0), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))  # the most likely token always stays
    assert top_p_filter(p, 1.0) is p


# ---- stop strings ----------------------------------------------------------------------------------------

def spanning_stop(tokenizer, ids: list[int]) -> tuple[str, str]:
    """A stop string made of the end of one token and the start of the next, first seen there; and the text
    before it. Neither token alone contains it."""
    pieces = token_texts(tokenizer, ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    at = 0
    for a, b in zip(pieces[3:], pieces[4:], strict=False):
        at = text.find(a, at)
        stop = a[-2:] + b[:2]
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in stop and stop not in a and stop not in b and text.find(stop) == at + len(a) - 2:
            return stop, text[: text.find(stop)]
        at += len(a)
    raise AssertionError("no token boundary to put a stop string across")


def check_stop_cuts_before_a_string_spanning_tokens(client, reference) -> None:
    ref = generate(reference, reference.tokenizer, QUESTION, max_new_tokens=40, temperature=0.0, chat=True)
    stop, before = spanning_stop(reference.tokenizer, ref.token_ids)
    for stream in (False, True):
        r = chat(client, max_tokens=40, temperature=0, stop=[stop, "never seen ✗"], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, finish) == (before, "stop"), f"stop {stop!r}"


def test_stop_string_spanning_a_token_boundary_cuts_the_answer_before_it(client, reference):
    check_stop_cuts_before_a_string_spanning_tokens(client, reference)


class PerTokenStop(TextStream):
    """The bug the stop test must catch: a stop string searched in each token's own text only."""

    def push(self, token_id: int) -> str:
        piece = self.tokenizer.decode([token_id], skip_special_tokens=True)
        if any(s in piece for s in self.stop):
            self.stopped = True
            return ""
        self.ids.append(int(token_id))
        return piece


def test_stop_test_fails_when_stop_strings_are_matched_per_token(client, reference, monkeypatch):
    """Negative control: the same check against per-token stop matching sees the answer run past the stop string."""
    import celeris.serve.worker as W

    monkeypatch.setattr(W, "TextStream", PerTokenStop)
    with pytest.raises(AssertionError, match="stop '"):
        check_stop_cuts_before_a_string_spanning_tokens(client, reference)


def test_text_stream_never_releases_half_a_character_and_cuts_stop_strings_on_text(server):
    tok = server.tokenizer
    text = "naïve 😀 façade — 5 €, ok 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in p for p in token_texts(tok, ids))  # some token holds part of a character
    stream = TextStream(tok)
    parts = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)
    for stop, before in (("😀", "naïve "), ("ç", "naïve 😀 fa"), ("€, o", "naïve 😀 façade — 5 "), ("日本", "naïve 😀 façade — 5 €, ok ")):
        stream = TextStream(tok, [stop, "absent"])
        out = "".join(stream.push(i) for i in ids)
        assert (out, stream.stopped) == (before, True)
    held = TextStream(tok, ["ok!"])  # a stop string's start is held back, then released when it does not complete
    out = "".join(held.push(i) for i in ids)
    assert out + held.flush() == text and not held.stopped


# ---- errors, limits, keys --------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "error", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, openai.BadRequestError, "tools"),
    ({"response_format": {"type": "json_object"}}, openai.BadRequestError, "response_format"),
    ({"logprobs": True}, openai.BadRequestError, "logprobs"),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ({"extra_body": {"top_k": 5}}, openai.BadRequestError, "top_k"),
    ({"max_tokens": CONTEXT * 4}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "user", "content": "hello world " * 200}]}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, openai.BadRequestError, "messages.0"),
    ({"max_tokens": -3}, openai.UnprocessableEntityError, "max_tokens"),
    ({"temperature": -0.5}, openai.UnprocessableEntityError, "temperature"),
    ({"top_p": 1.5}, openai.UnprocessableEntityError, "top_p"),
    ({"n": 0}, openai.UnprocessableEntityError, "n"),
    ({"messages": []}, openai.UnprocessableEntityError, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.UnprocessableEntityError, "messages.0.role"),
    ({"extra_body": {"temperature": "hot"}}, openai.UnprocessableEntityError, "temperature"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_each_bad_request_raises_the_clients_own_error_with_openais_error_object(client, server, extra, error, param):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    with pytest.raises(error) as e:
        client.chat.completions.create(**kw)
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"] and body["param"] == param
    if "context" in body["message"]:
        assert body["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # and the server lives on


def test_malformed_oversized_and_unknown_requests_get_error_objects_never_a_500(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (b'{"model": "tiny-chat"}', 422),
                         (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * BODY_CAP}]}).encode(), 413),
                         (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 422)):
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    chunked = httpx.post(url, content=iter([b"{" + b" " * 8192] * 3), headers=auth)  # no Content-Length: counted as read
    assert chunked.status_code == 413
    assert httpx.get(server.url + "/v1/nowhere", headers=auth).status_code == 404
    assert httpx.get(url, headers=auth).status_code == 405
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).completions.create(
            model=MODEL, prompt="y" * BODY_CAP, max_tokens=2)
    assert e.value.status_code == 413


def test_without_the_api_key_every_v1_route_is_401_and_the_page_and_health_stay_open(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            chat(bad, max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json()["kv_cache_bytes"] == server.engine.kv_bytes > 0  # what a soak subtracts from the RSS
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no CDN: nothing loaded from elsewhere


def test_a_full_queue_refuses_and_a_stopped_worker_refuses(server):
    worker = ModelWorker(server.engine, max_queue=1)  # never started: requests stay queued
    params = SamplingParams(max_tokens=2)
    worker.submit(GenerationRequest([1, 2], params, sync=True))
    with pytest.raises(WorkerBusy, match="busy"):
        worker.submit(GenerationRequest([1, 2], params, sync=True))
    worker.stop(timeout=0)
    with pytest.raises(WorkerBusy, match="shutting down"):
        worker.submit(GenerationRequest([1, 2], params, sync=True))


# ---- cancellation --------------------------------------------------------------------------------------

@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each decode step takes 20 ms more: a 150-token answer lasts 3 s."""
    step = server.engine.decode_step

    def slow(tok):
        time.sleep(0.02)
        return step(tok)

    monkeypatch.setattr(server.engine, "decode_step", slow)


def next_request_wait(client, hang_up) -> float:
    """Start a long streamed answer, read 3 chunks, `hang_up`, then return how long the next request queued."""
    stream = chat(client, max_tokens=150, temperature=0, stream=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    hang_up(stream)
    r = chat(client, "a short one", max_tokens=3, temperature=0)
    return r.model_extra["celeris"]["queue_seconds"]


def test_a_client_hanging_up_mid_stream_frees_the_worker_for_the_next_request(client, server, slow_steps):
    assert next_request_wait(client, lambda s: s.close()) < 0.5  # vs ~3 s had the answer run to its end


def test_the_disconnect_test_sees_a_worker_that_ignores_cancel(client, server, slow_steps, monkeypatch):
    """Negative control: with cancel disabled the next request waits for the abandoned answer."""
    monkeypatch.setattr(GenerationRequest, "cancel", lambda self: None)
    assert next_request_wait(client, lambda s: s.close()) > 1.5


def test_a_client_timing_out_on_a_plain_request_frees_the_worker(client, server, slow_steps):
    quick = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        chat(quick, max_tokens=150, temperature=0)
    assert chat(client, "a short one", max_tokens=3, temperature=0).model_extra["celeris"]["queue_seconds"] < 0.5


# ---- continuous batching (--max-batch > 1) -------------------------------------------------------------------

ROWS = 3


@pytest.fixture(scope="module")
def batch_server(tiny_dir):
    """The same model served with up to 3 requests decoded together."""
    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    worker = ModelWorker(engine, max_queue=8, max_batch=ROWS)
    url, thread, srv = start_server(create_app(worker, MODEL, api_key=KEY))
    yield SimpleNamespace(url=url, worker=worker)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def batch_steps(batch_server, monkeypatch) -> list[int]:
    """Each batched step takes 20 ms more (so requests sent together overlap); returns the rows each step ran."""
    engine = batch_server.worker.batch
    step, widths = engine.decode_step, []

    def slow(tokens):
        widths.append(sum(engine.live[: tokens.shape[0]]))
        time.sleep(0.02)
        return step(tokens)

    monkeypatch.setattr(engine, "decode_step", slow)
    return widths


def batch_client(server, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)


def in_threads(calls) -> list:
    """Run each call in its own thread, started 30 ms apart (so they join the batch at different steps)."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # surfaced by the assertion on results
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
        time.sleep(0.03)
    for t in threads:
        t.join(120)
    return results


BATCH_PROMPTS = [(QUESTION, 40), ("hi", 30), ("def f(x): return the quick brown fox, twice " * 3, 35),
                 ("Café crème?", 25), ("hello world", 20)]


def test_concurrent_greedy_requests_decoded_together_equal_each_alone(batch_server, reference, batch_steps):
    """Five clients (threads, the official client, some streaming) on 3 rows: requests share steps, join as others
    leave, and each gets exactly `celeris generate`'s greedy text on the batch-1 engine."""
    refs = [generate(reference, reference.tokenizer, q, max_new_tokens=n, temperature=0.0, chat=True)
            for q, n in BATCH_PROMPTS]
    assert len({r.text for r in refs}) == len(refs) and all(len(set(r.token_ids)) >= 8 for r in refs)

    def ask(q, n, stream):
        client = batch_client(batch_server)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in chat(client, q, max_tokens=n, temperature=0,
                                                                           stream=True))
        return chat(client, q, max_tokens=n, temperature=0).choices[0].message.content

    got = in_threads([lambda q=q, n=n, i=i: ask(q, n, i % 2 == 1) for i, (q, n) in enumerate(BATCH_PROMPTS)])
    assert got == [r.text for r in refs]
    assert max(batch_steps) == ROWS and min(batch_steps) < ROWS  # full steps, and steps while rows joined or left
    assert batch_server.worker.rows == {} and batch_server.worker.batch.width == 0


def test_seeded_sampling_in_a_shared_batch_gives_the_text_it_gives_alone(batch_server, client, batch_steps):
    """A seeded request samples from its own generator: alone, beside two unseeded sampled requests, or on the
    one-at-a-time server, the same text."""
    def seeded():
        return chat(batch_client(batch_server), max_tokens=30, temperature=1.0, seed=7).choices[0].message.content

    alone = seeded()
    assert max(batch_steps) == 1
    noise = [lambda: chat(batch_client(batch_server), "something else", max_tokens=40, temperature=1.0)
             .choices[0].message.content] * 2
    shared = in_threads([noise[0], seeded, noise[1]])
    assert max(batch_steps) == ROWS
    assert shared[1] == alone
    assert alone == chat(client, max_tokens=30, temperature=1.0, seed=7).choices[0].message.content
    assert alone != chat(batch_client(batch_server), max_tokens=30, temperature=1.0, seed=8).choices[0].message.content


def batch_wait_after_hang_up(server) -> float:
    """Fill every row with a long streamed answer (~3 s each), hang up one after 3 chunks, then return how long
    a short request queued for a row."""
    streams = [chat(batch_client(server), QUESTION, max_tokens=150, temperature=0, stream=True) for _ in range(ROWS)]
    for s in streams:
        for _, _ in zip(range(3), s, strict=False):
            pass
    streams[0].close()
    try:
        r = chat(batch_client(server), "a short one", max_tokens=3, temperature=0)
        return r.model_extra["celeris"]["queue_seconds"]
    finally:
        for s in streams[1:]:
            s.close()


def wait_idle(worker, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while worker.rows and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_client_hanging_up_frees_its_row_for_a_waiting_request(batch_server, batch_steps):
    assert batch_wait_after_hang_up(batch_server) < 0.5  # vs ~3 s had the abandoned answer kept its row
    wait_idle(batch_server.worker, 1)  # the other two hung up at the end: their rows are freed too
    assert batch_server.worker.rows == {}


def test_the_batched_disconnect_test_sees_a_worker_that_ignores_cancel(batch_server, batch_steps, monkeypatch):
    """Negative control: with cancel disabled the short request waits until a row's answer runs to its end."""
    monkeypatch.setattr(GenerationRequest, "cancel", lambda self: None)
    assert batch_wait_after_hang_up(batch_server) > 1.5
    wait_idle(batch_server.worker)  # the uncancelled answers run to their end before the next test


def steps_after_a_cancel(worker, widths: list[int]) -> tuple[str, list[int]]:
    """Two greedy requests decode together; cancel the first after 5 tokens. Returns its finish reason and the live
    rows of every step that started after the cancel."""
    first = GenerationRequest(list(range(1, 20)), SamplingParams(max_tokens=60, temperature=0), sync=True)
    second = GenerationRequest(list(range(5, 30)), SamplingParams(max_tokens=80, temperature=0), sync=True)
    worker.submit(first)
    worker.submit(second)
    events = first.iter_events()
    for event in events:
        if isinstance(event, Delta) and event.tokens >= 5:
            break
    first.cancel()
    n = len(widths)  # steps recorded from here on started after the cancel
    reason = list(events)[-1].reason
    finished = list(second.iter_events())[-1]
    assert finished.reason == "length" and finished.completion_tokens == 80
    return reason, widths[n:]


def test_a_cancelled_request_leaves_the_batch_within_one_step(batch_server, batch_steps):
    reason, after = steps_after_a_cancel(batch_server.worker, batch_steps)
    assert reason == "cancelled"
    assert after[0] <= 2 and set(after[1:]) == {1}  # at most the step already under way ran its row


def test_the_one_step_test_sees_a_worker_that_ignores_cancel(batch_server, batch_steps, monkeypatch):
    """Negative control: with cancel disabled the first request keeps its row until its 60th token."""
    monkeypatch.setattr(GenerationRequest, "cancel", lambda self: None)
    reason, after = steps_after_a_cancel(batch_server.worker, batch_steps)
    assert reason == "length" and after.count(2) > 20


def test_batched_server_reports_its_rows_and_no_prefix_reuse(batch_server):
    client = batch_client(batch_server)
    assert client.models.list().data[0].model_extra["celeris"]["max_batch"] == ROWS
    chat(client, max_tokens=3, temperature=0)
    r = chat(client, max_tokens=3, temperature=0)  # the same prompt again: prefilled in full at max_batch > 1
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.model_extra["celeris"]["decoder"] == "plain" and r.model_extra["celeris"]["batch_rows"] == ROWS


def drafting_then_batched(tiny_dir, monkeypatch, broken_adopt: bool = False):
    """A worker with a drafter and 3 rows: request A arrives alone (drafted on the batch-1 engine, each verify step
    20 ms slower), B arrives after A's 6th token. Returns A's and B's finished events and answer token ids."""
    import celeris.serve.worker as W
    from celeris.engine import BatchEngine
    from celeris.speculative import new_drafter

    taken: dict[int, list[int]] = {}
    take = W._Answer.take
    monkeypatch.setattr(W._Answer, "take", lambda self, ids: taken.setdefault(id(self.req), []).extend(ids)
                        or take(self, ids))

    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    drafter = new_drafter(engine.model, torch.arange(engine.model.config.vocab_size), seed=1)
    worker = ModelWorker(engine, drafter, max_queue=4, max_batch=ROWS)
    verify = engine.verify_step
    monkeypatch.setattr(engine, "verify_step", lambda *a, **k: time.sleep(0.02) or verify(*a, **k))
    if broken_adopt:  # the row gets every committed slot but the last
        adopt = BatchEngine.adopt

        def off_by_one(self, row, eng):
            adopt(self, row, eng)
            for layer in self.cache.layers:
                layer.keys[row, :, eng.filled - 1] = 0
                layer.values[row, :, eng.filled - 1] = 0
        monkeypatch.setattr(BatchEngine, "adopt", off_by_one)
    worker.start()
    a_ids, b_ids = list(range(1, 20)), list(range(7, 30))
    a = GenerationRequest(a_ids, SamplingParams(max_tokens=60, temperature=0), sync=True)
    b = GenerationRequest(b_ids, SamplingParams(max_tokens=30, temperature=0), sync=True)
    worker.submit(a)
    events = a.iter_events()
    for event in events:
        if isinstance(event, Delta) and event.tokens >= 6:
            break
    worker.submit(b)
    a_end, b_end = list(events)[-1], list(b.iter_events())[-1]
    worker.stop()
    return a_end, taken[id(a)][: a_end.completion_tokens], b_end, taken[id(b)][: b_end.completion_tokens]


def answer_ids(engine, ids: list[int], n: int) -> list[int]:
    return engine_decode(engine, torch.tensor([ids]), n).tolist()


def test_a_drafting_request_moves_into_the_batch_when_another_arrives_and_keeps_its_greedy_tokens(
        tiny_dir, reference, monkeypatch):
    """--drafter with --max-batch 3: a lone request drafts; when a second arrives it goes on batched from its
    committed K/V (`BatchEngine.adopt`). Both answers are plain greedy decoding's, token for token (the text is
    compared up to EOS)."""
    a_end, a, b_end, b = drafting_then_batched(tiny_dir, monkeypatch)
    assert a_end.stats["decoder"] == "redrafter, then batched" and b_end.stats["decoder"] == "plain"
    assert len(a) >= 30 and len(b) >= 10
    assert a == answer_ids(reference, list(range(1, 20)), 60)[: len(a)]
    assert b == answer_ids(reference, list(range(7, 30)), 30)[: len(b)]
    assert len(set(a[6:])) >= 10  # the batched part varies: a wrong slot would show


def test_the_migration_test_sees_a_row_missing_its_last_committed_slot(tiny_dir, reference, monkeypatch):
    """Negative control: an `adopt` that leaves the last committed slot empty changes the moved answer."""
    a_end, a, _, _ = drafting_then_batched(tiny_dir, monkeypatch, broken_adopt=True)
    assert a_end.stats["decoder"] == "redrafter, then batched"
    assert a != answer_ids(reference, list(range(1, 20)), 60)[: len(a)]


# ---- ReDrafter ---------------------------------------------------------------------------------------------

@pytest.fixture
def drafter_server(tiny_dir):
    from celeris.speculative import new_drafter

    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    drafter = new_drafter(engine.model, torch.arange(engine.model.config.vocab_size), seed=1)
    worker = ModelWorker(engine, drafter)
    worker.warm_up()  # as `load_worker` does: the adaptive length's verify costs timed, nothing left committed
    assert engine.filled == 0
    url, thread, srv = start_server(create_app(worker, MODEL, api_key=KEY))
    yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    srv.should_exit = True
    thread.join(10)


def test_redrafter_greedy_over_http_equals_plain_greedy_and_samples_top_p_itself(drafter_server, reference):
    ref = generate(reference, reference.tokenizer, QUESTION, max_new_tokens=40, temperature=0.0, chat=True)
    r = chat(drafter_server, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == 40
    extra = r.model_extra["celeris"]
    assert extra["decoder"] == "redrafter" and extra["target_steps"] <= 40
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(drafter_server, max_tokens=40, temperature=0, stream=True))
    assert streamed == ref.text
    a = chat(drafter_server, max_tokens=20, temperature=0.8, seed=3).choices[0].message.content
    assert a == chat(drafter_server, max_tokens=20, temperature=0.8, seed=3).choices[0].message.content
    nucleus = chat(drafter_server, max_tokens=20, temperature=0.8, top_p=0.9, seed=3)  # exact: test_speculative.py
    assert nucleus.model_extra["celeris"]["decoder"] == "redrafter"
    assert nucleus.choices[0].message.content == chat(drafter_server, max_tokens=20, temperature=0.8, top_p=0.9,
                                                       seed=3).choices[0].message.content
    one = chat(drafter_server, max_tokens=40, temperature=0.8, top_p=0.0)  # a nucleus of one token: greedy's answer
    assert one.choices[0].message.content == ref.text and one.model_extra["celeris"]["decoder"] == "redrafter"


# ---- a KV-memory policy, with and without ReDrafter -----------------------------------------------------------

@pytest.fixture(params=["plain", "drafter"])
def memory_server(tiny_dir, request):
    from celeris.speculative import new_drafter

    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    drafter = (new_drafter(engine.model, torch.arange(engine.model.config.vocab_size), seed=1)
               if request.param == "drafter" else None)
    worker = ModelWorker(engine, drafter, memory=("h2o", "24"))
    url, thread, srv = start_server(create_app(worker, MODEL, api_key=KEY))
    yield SimpleNamespace(client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60),
                          drafter=drafter, kind=request.param)
    srv.should_exit = True
    thread.join(10)


def test_a_memory_policy_served_gives_run_with_memory_and_is_greedy_only(memory_server, reference):
    """Under --memory h2o with a 24-token budget (--drafter too), the answer over HTTP, streamed or not, is the
    memory runner's plain greedy answer on the same prompt (drafting under a policy gives plain decoding's tokens,
    celeris.compose), and sampling is refused with a 400."""
    from celeris.generation import encode_prompt, eos_token_ids
    from celeris.memory import make_policy, parse_budget, run_with_memory

    client = memory_server.client
    prompt = " ".join([QUESTION] * 8)  # past one n_up = 128 window: the policy evicts during the prompt
    ids = encode_prompt(reference.tokenizer, prompt, True)
    assert 128 < ids.shape[1] < CONTEXT - 40
    eos = eos_token_ids(reference.model, reference.tokenizer)
    want = run_with_memory(reference, ids, make_policy("h2o"), parse_budget("24"), max_new_tokens=40, eos_ids=eos)
    assert want.evictions >= 1 and len(set(want.new_ids)) >= 5
    text = reference.tokenizer.decode(want.new_ids, skip_special_tokens=True)
    r = chat(client, prompt, max_tokens=40)  # temperature left out: greedy on this server
    assert r.choices[0].message.content == text
    extra = r.model_extra["celeris"]
    assert extra["decoder"] == ("redrafter" if memory_server.drafter is not None else "plain") + "+memory:h2o"
    assert extra["memory"] == {"policy": "h2o", "budget": "24tok"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, prompt, max_tokens=40, temperature=0, stream=True))
    assert streamed == text
    with pytest.raises(openai.BadRequestError, match="greedily") as e:
        chat(client, max_tokens=5, temperature=0.7)
    assert e.value.body["param"] == "temperature"


# ---- the command ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "words"), [
    (["--max-batch", "0"], ["--max-batch must be at least 1"]),
    (["--port", "70000"], ["--port"]),
    (["--max-context", "1"], ["--max-context"]),
    (["--max-queue", "0"], ["--max-queue"]),
    (["--api-key", " "], ["--api-key"]),
    (["--drafter", "/no/such/drafter"], ["--drafter", "no drafter"]),
    (["--threads", "0"], ["--threads"]),
    (["--memory", "nosuch"], ["nosuch"]),
    (["--memory", "h2o", "--max-batch", "2"], ["--max-batch 2", "one at a time"]),
    (["--budget", "0.5"], ["--budget needs --memory"]),
])
def test_serve_refuses_bad_options_in_one_line_before_loading_anything(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "/no/such/model", *argv])  # a model that would fail to load: checked first
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words) and "/no/such/model" not in lines[0]


def test_celeris_serve_answers_then_drains_and_exits_on_sigterm(tmp_path):
    model = make_tiny_dir(tmp_path / "m", context=2048)
    env = {**os.environ, "CELERIS_API_KEY": KEY}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("celeris")), "serve", "--model", str(model), "--port", "0",
                             "--quantize", "none", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        port, lines = None, []
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port is not None and any(line.startswith("serving ") for line in lines), "".join(lines)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert c.models.list().data[0].id == str(model)
        stream = c.completions.create(model=str(model), prompt="The quick", max_tokens=1500, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # in-flight: the answer is allowed to finish (drain), then the process exits
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 1500 or rest[-2].choices[0].finish_reason == "stop"
        assert proc.wait(30) == 0
        with pytest.raises(openai.APIConnectionError):
            c.models.list()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_the_default_model_over_http_answers_as_celeris_generate():
    """The default model on the default engine, as `celeris serve` loads it (4 rows decoded together): three
    concurrent greedy requests answer as `celeris generate`; one at a time, a repeated prompt reuses its prefix."""
    from celeris.models import DEFAULT_MODEL
    from celeris.serve import load_worker

    worker = load_worker()
    engine = worker.engine
    assert worker.max_batch == 4
    prompts = ["What is the capital of France?", "Name three colours.", "Write one short sentence about the sea."]
    refs = [generate(engine, engine.tokenizer, p, max_new_tokens=12, temperature=0.0).text for p in prompts]

    def ask(url, prompt):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        return client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=12, temperature=0)

    url, thread, srv = start_server(create_app(worker, DEFAULT_MODEL))
    try:
        got = in_threads([lambda p=p: ask(url, p).choices[0].message.content for p in prompts])
        assert got == refs and "Paris" in refs[0]
    finally:
        srv.should_exit = True
        thread.join(30)
    single = ModelWorker(engine, max_batch=1)
    url, thread, srv = start_server(create_app(single, DEFAULT_MODEL))
    try:
        for reuse in (False, True):  # the engine holds this very prompt: reused, only its last token runs again
            single.prefix_cache = reuse
            r = ask(url, prompts[0])
            assert r.choices[0].message.content == refs[0]
            assert r.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1 if reuse else 0)
    finally:
        srv.should_exit = True
        thread.join(30)


def test_run_decodes_on_the_calling_thread_until_stopped(tiny_dir):
    """`ModelWorker.run` (what `celeris serve` does on its main thread): requests are decoded on the caller's thread,
    `start()` does not start a second one, and `stop()` from another thread ends `run()`."""
    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    worker, seen = ModelWorker(engine, max_batch=2), []
    step = worker.batch.decode_step

    def spy(tokens):
        seen.append(threading.current_thread())
        return step(tokens)

    worker.batch.decode_step = spy
    caller = threading.Thread(target=worker.run)
    caller.start()
    worker.start()  # the app's lifespan calls it: a no-op while run() decodes
    req = GenerationRequest(engine.tokenizer("hello world")["input_ids"], SamplingParams(max_tokens=6, temperature=0),
                            sync=True)
    worker.submit(req)
    events = list(req.iter_events())
    assert events[-1].completion_tokens == 6 and worker.alive
    assert seen and set(seen) == {caller} and worker._thread.ident is None
    worker.stop(10)
    caller.join(10)
    assert not caller.is_alive() and not worker.alive


def test_celeris_serve_decodes_on_the_thread_that_loaded_the_model(monkeypatch, tiny_dir):
    """The model is loaded and stepped on the main thread; uvicorn runs on another (a model stepped on a second
    thread ran at half speed: `ModelWorker.run`)."""
    import uvicorn

    from celeris.serve import server as server_mod

    engine = load_engine(str(tiny_dir), quantize="none", max_len=CONTEXT, progress=False)
    worker, where = ModelWorker(engine), {}
    monkeypatch.setattr(server_mod, "load_worker", lambda *a, **k: worker)
    monkeypatch.setattr(worker, "run", lambda: where.setdefault("model", threading.current_thread()))

    def fake_run(self, sockets=None):
        where["http"] = threading.current_thread()
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server_mod.serve(str(tiny_dir), port=0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert where["model"] is threading.main_thread() and where["http"] is not threading.main_thread()
    assert worker.runs_on_caller
