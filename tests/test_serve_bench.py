"""`celeris bench serve` end to end on a tiny random model: subprocess servers, `openai` clients, the table."""

from __future__ import annotations

import pytest

from celeris.serve.bench import format_table, percentile, run_serve_benchmark
from test_serve import make_tiny_dir


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
    assert res["peer"]["status"].startswith("could not start: llama-cpp-python exited")
    assert [(r["server"], r["clients"]) for r in res["rows"]] == [("celeris", 1), ("celeris", 2)]
    for row in res["rows"]:
        (p,) = row["passes"]
        assert p["errors"] == {} and p["completed"] == 3
        assert p["tokens_counted_by"] == ["usage"] and 3 <= p["output_tokens"] <= 12
        assert p["ttft_p50_s"] <= p["latency_p50_s"]
    assert res["environment"]["commit"] and res["settings"]["threads"] == 1
    table = format_table(res)
    assert "celeris" in table and "peer llama-cpp-python: could not start" in table
