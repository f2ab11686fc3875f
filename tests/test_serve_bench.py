"""`celeris bench serve` end to end on a tiny random model: subprocess servers, `openai` clients, the table."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import openai
import pytest

from celeris.models import default_gguf_path
from celeris.report import spread
from celeris.serve import bench
from celeris.serve.bench import (
    _LISTENING,
    choose_peer,
    find_llama_server,
    format_table,
    llama_server,
    llama_server_version,
    percentile,
    run_level,
    run_serve_benchmark,
    stream_request,
    vs_peer,
)
from test_bad_input import assert_one_line_error, run_cli
from test_serve import make_tiny_dir


def test_vs_peer_divides_pass_by_pass_not_medians():
    mine, theirs = spread([2.0, 4.0, 6.0]), spread([1.0, 2.0, 2.0])
    assert vs_peer(mine, theirs) == spread([2.0, 2.0, 3.0])  # medians alone would say 4 / 2 = 2 with no spread
    assert vs_peer(mine, spread([1.0, 2.0])) is None and vs_peer(None, theirs) is None


def test_percentile_interpolates_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([], 50) is None


def test_bench_serve_reports_celeris_and_says_plainly_when_the_peer_cannot_start(tmp_path):
    model = make_tiny_dir(tmp_path / "tiny")
    not_a_gguf = tmp_path / "broken.gguf"
    not_a_gguf.write_bytes(b"not a gguf file")
    res = run_serve_benchmark(["hello world", "the quick brown fox"], str(model), gguf=not_a_gguf,
                              concurrency=(1, 2), requests=3, max_tokens=4, repeats=1, timeout=60, threads=1,
                              quantize="none", start_timeout=120, say=lambda m: None)
    peer = res["peer"]["name"]  # the best installed here: llama-server, llama-cpp-python or none
    if peer != "none":
        assert res["peer"]["status"].startswith(f"could not start: {peer} exited")
    assert [(r["server"], r["clients"]) for r in res["rows"]] == [("celeris", 1), ("celeris", 2)]
    for row in res["rows"]:
        (p,) = row["passes"]
        assert p["errors"] == {} and p["completed"] == 3
        assert p["tokens_counted_by"] == ["usage"] and 3 <= p["output_tokens"] <= 12
        assert p["ttft_p50_s"] <= p["latency_p50_s"]
    assert res["environment"]["commit"] and res["settings"]["threads"] == 1
    assert res["environment"]["artifacts"]["gguf"]["sha256"] == hashlib.sha256(b"not a gguf file").hexdigest()
    assert set(res["environment"]["artifacts"]["model"]["files"]) >= {"config.json"}
    for row in res["rows"]:  # each figure over the repeats, its one run listed
        assert row["tokens_per_s"]["runs"] == [row["passes"][0]["tokens_per_s"]] == [row["tokens_per_s"]["median"]]
    table = format_table(res)
    assert "celeris" in table and f"peer {peer}" in table and res["peer"]["why"] in table
    if peer != "none":
        assert f"peer {peer}: could not start" in table


# The llama.cpp peers: command lines and the choice among them need no binary; one test runs the real llama-server.


def test_llama_server_command_gives_each_slot_the_peer_context_on_loopback():
    s = llama_server(Path("/opt/llama-server"), Path("m.gguf"), threads=3, n_ctx=2048, parallel=4)
    cmd = s.command
    flag = {a: b for a, b in zip(cmd[1::2], cmd[2::2], strict=False)}  # option -> value, for the valued ones
    assert cmd[0] == "/opt/llama-server" and s.name == "llama-server" and s.health_path == "/health"
    assert flag["--model"] == "m.gguf" and flag["--host"] == "127.0.0.1" and flag["--port"] == "0"
    assert flag["--threads"] == flag["--threads-batch"] == "3"
    assert flag["--parallel"] == "4" and flag["--ctx-size"] == str(4 * 2048)  # split among the 4 slots
    assert "--cont-batching" in cmd and cmd[cmd.index("--n-gpu-layers") + 1] == "0"
    assert s.extra_body == {}  # its repeat penalty is off by default: plain greedy as sent


def test_celeris_server_command_passes_compile_and_stays_on_loopback():
    on, off = (bench.celeris_server(None, 2, None, "none", "auto", compile=c).command for c in (True, False))
    assert "--compile" in on and "--no-compile" not in on and "--no-compile" in off and "--compile" not in off
    assert on[on.index("--host") + 1] == "127.0.0.1" and on[on.index("--threads") + 1] == "2"


def test_listening_line_of_uvicorn_and_of_llama_server_gives_the_port():
    uvicorn = "INFO:     Uvicorn running on http://127.0.0.1:43127 (Press CTRL+C to quit)"
    llama = "main: server is listening on http://127.0.0.1:40515 - starting the main loop"
    llama_new = "srv          main: listening on http://127.0.0.1:39001"
    assert [_LISTENING.search(line).group(1) for line in (uvicorn, llama, llama_new)] == ["43127", "40515", "39001"]


BINARY = Path("/opt/llama-server")


@pytest.mark.parametrize("asked, binary, has_lcp, peer, why", [
    ("auto", BINARY, True, "llama-server", "the best peer, found at /opt/llama-server"),
    ("auto", None, True, "llama-cpp-python", "llama-server not found (`make peers` builds it)"),
    ("auto", None, False, "none", "neither llama-server"),
    ("llama-cpp-python", BINARY, True, "llama-cpp-python", "asked for (--peer llama-cpp-python)"),
    ("llama-server", BINARY, False, "llama-server", "asked for (--peer llama-server)"),
    ("none", BINARY, True, "none", "asked for (--peer none)"),
])
def test_auto_takes_the_best_peer_installed_and_says_why(asked, binary, has_lcp, peer, why):
    chosen, reason = choose_peer(asked, binary, has_lcp)
    assert chosen == peer and reason.startswith(why)


@pytest.mark.parametrize("asked, words", [("llama-server", ("llama-server", "make peers")),
                                          ("llama-cpp-python", ("llama-cpp-python", "celeris[peers]"))])
def test_a_peer_asked_for_but_not_installed_is_one_line_and_exit_2(asked, words, monkeypatch, capsys):
    monkeypatch.setattr(bench, "find_llama_server", lambda: None)
    monkeypatch.setattr(bench, "llama_cpp_python_server_installed", lambda: False)
    code, _, err = run_cli(capsys, "bench", "serve", "--peer", asked, "--requests", "1")
    assert_one_line_error(code, err, *words)


def test_llama_server_version_is_the_line_naming_the_commit(tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'version: 7 (abc1234)' >&2\necho 'built with GNU 12.2.0 for x86_64' >&2\n")
    fake.chmod(0o755)
    assert llama_server_version(fake) == "version: 7 (abc1234)"
    assert llama_server_version(tmp_path / "missing").startswith("unknown")


@pytest.mark.integration
@pytest.mark.skipif(find_llama_server() is None,
                    reason="no llama-server binary beside this Python or on PATH (`make peers` builds it)")
def test_real_llama_server_answers_the_bench_client_on_the_default_gguf():
    server = llama_server(find_llama_server(), default_gguf_path(), threads=1, n_ctx=512, parallel=2)
    try:
        server.start(timeout=120)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        answer = stream_request(client, server, "What is the capital of France?", 8, time.monotonic() + 60)
        level = run_level(server, ["hello", "Name a colour."], clients=2, requests=2, max_tokens=8, timeout=60)
    finally:
        server.stop()
    assert answer.error is None and answer.text.strip() and 1 <= answer.tokens <= 8
    assert answer.counted_by == "usage" and answer.ttft <= answer.latency
    assert level["completed"] == 2 and level["errors"] == {} and 2 <= level["output_tokens"] <= 16
    assert server.proc.returncode is not None  # stopped
