"""Time to first token of `celeris serve` over a multi-turn conversation, with and without prompt-prefix reuse.

    python benchmarks/serve_prefix_cache.py [--turns 4] [--repeats 5] [--max-tokens 16] [--json OUT]

The default model on the default engine (eager), a server in this process on a loopback port, the official
`openai` client streaming. The conversation: a ~1,000-token Python module in the first user message, then
questions about it; each turn's prompt is the whole conversation so far. The same message lists are sent
with the worker's prefix cache on and off (the order alternating pass by pass; the assistant turns are the model's
own greedy answers from the warm-up pass, which is not timed). Time to first token is measured by the client
(request sent → first content chunk): median (min-max) of --repeats passes, the speed-up pass by pass; the JSON
carries the environment record. Fixed prompts, greedy decoding.
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import socket
import threading
import time

import openai
import uvicorn

from celeris.errors import CelerisError
from celeris.io import write_json
from celeris.models import default_gguf_path
from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread
from celeris.serve import create_app, load_worker

QUESTIONS = ["What does this module do?", "Which function turns a JSON string into a Python string?",
             "How are errors reported?", "Name one constant defined in it.", "Summarise it in one sentence.",
             "What would you test first?"]


def first_token_seconds(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return (first or time.perf_counter()) - t0, "".join(text), usage.model_dump()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--repeats", type=int, default=REPEATS, help="Timed passes (cache on and off) after the warm-up pass.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    try:
        check_repeats(a.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    env = environment({"gguf": default_gguf_path()})
    worker = load_worker(max_batch=1)  # prefix reuse is a one-at-a-time feature
    model = "SmolLM2-135M-Instruct"
    server = uvicorn.Server(uvicorn.Config(create_app(worker, model), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0)
    source = inspect.getsource(json.decoder)[:4000]
    conversation = [[{"role": "user", "content": f"Here is a Python module:\n```python\n{source}\n```\n{QUESTIONS[0]}"}]]
    rows = {True: [[] for _ in range(a.turns)], False: [[] for _ in range(a.turns)]}
    prompt_tokens, cached = [0] * a.turns, [0] * a.turns
    answer = ""
    for rep in range(-1, a.repeats):  # -1: the warm-up pass, which also grows the conversation with the model's answers
        k = max(rep, 0) % 2
        for reuse in (True, False)[k:] + (True, False)[:k]:  # the order alternates pass by pass
            worker.prefix_cache = reuse
            first_token_seconds(client, model, [{"role": "user", "content": "Hello!"}], 2)  # another conversation in between
            for turn in range(a.turns):
                if turn == len(conversation):
                    prev = conversation[-1]
                    conversation.append(prev + [{"role": "assistant", "content": answer},
                                                {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}])
                seconds, answer, usage = first_token_seconds(client, model, conversation[turn], a.max_tokens)
                if rep >= 0:
                    rows[reuse][turn].append(seconds)
                prompt_tokens[turn] = usage["prompt_tokens"]
                if reuse:
                    cached[turn] = usage["prompt_tokens_details"]["cached_tokens"]
                print(f"{'warm-up' if rep < 0 else f'repeat {rep + 1}'} prefix cache {'on ' if reuse else 'off'} "
                      f"turn {turn + 1}: {seconds:.3f} s ({usage['prompt_tokens']} prompt tokens, "
                      f"{usage['prompt_tokens_details']['cached_tokens']} cached)", flush=True)
    server.should_exit = True
    thread.join(30)  # the app's shutdown stops the worker thread
    table = []
    print(f"\nmedian (min-max) of {a.repeats} passes after a warm-up pass; speed-up pass by pass")
    print(f"{'turn':>4}{'prompt tokens':>15}{'cached':>8}{'TTFT off (s)':>24}{'TTFT on (s)':>24}{'speed-up':>20}")
    for turn in range(a.turns):
        off, on = spread(rows[False][turn]), spread(rows[True][turn])
        speedup = ratio(off, on)
        table.append({"turn": turn + 1, "prompt_tokens": prompt_tokens[turn], "cached_tokens": cached[turn],
                      "ttft_off_s": off, "ttft_on_s": on, "speedup": speedup})
        print(f"{turn + 1:>4}{prompt_tokens[turn]:>15}{cached[turn]:>8}{format_spread(off, 3):>24}{format_spread(on, 3):>24}"
              f"{format_spread(speedup, 2):>20}")
    if a.json:
        write_json(a.json, {"environment": env, "settings": {**vars(a), "engine": worker.engine.info.to_dict(), "model": model},
                            "turns": table})


if __name__ == "__main__":
    main()
