"""What every benchmark JSON carries: repeated figures as median with min–max (`celeris.report`), the environment
record, and for the older benches (sweep, CALM, curation, federated) those fields on a tiny run."""

from __future__ import annotations

import hashlib
import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

from celeris.errors import CelerisError
from celeris.report import check_repeats, environment, format_spread, interleaved, rate, ratio, spread

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = {"commit", "dirty", "cpu", "cores", "usable_cores", "threads", "load_average", "torch", "transformers", "python",
            "artifacts"}


def _script(name: str):
    """A benchmark script (benchmarks/ is not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeClock:
    """A clock that only moves when the work under test says it took time."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_interleaved_reports_median_min_max_of_the_timed_passes_after_the_warm_up():
    clock, order = _FakeClock(), []
    durations = {"a": iter([9.0, 1.0, 2.0, 4.0]), "b": iter([9.0, 0.5, 0.5, 1.0])}  # the first is the warm-up

    def work(name):
        def run() -> int:
            order.append(name)
            clock.t += next(durations[name])
            return 10  # tokens
        return rate(run, clock)

    figs = interleaved({"a": work("a"), "b": work("b")}, repeats=3, warmup=1)
    assert figs["a"] == {"median": 5.0, "min": 2.5, "max": 10.0, "runs": [10.0, 5.0, 2.5]}  # the 9 s warm-up dropped
    assert figs["b"] == {"median": 20.0, "min": 10.0, "max": 20.0, "runs": [20.0, 20.0, 10.0]}
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order rotated each pass
    assert ratio(figs["a"], figs["b"]) == {"median": 0.25, "min": 0.25, "max": 0.5, "runs": [0.5, 0.25, 0.25]}
    assert format_spread(figs["a"]) == "5.0 (2.5–10.0)" and format_spread(None) == "-"
    assert spread([3, 1, 2, 10]) == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": [3.0, 1.0, 2.0, 10.0]}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_repeats_below_one_are_refused_with_the_option_named(bad):
    with pytest.raises(CelerisError, match="--repeats must be a whole number of at least 1"):
        check_repeats(bad)
    with pytest.raises(CelerisError, match="--repeats"):
        interleaved({"a": lambda: 1.0}, repeats=bad)
    with pytest.raises(CelerisError, match="at least one run"):
        spread([])
    assert check_repeats(1) == 1


def test_environment_records_the_machine_versions_and_each_artifact_hash(tmp_path, tiny_llama):
    (tmp_path / "drafter").mkdir()
    (tmp_path / "drafter" / "drafter.json").write_text('{"a": 1}')
    (tmp_path / "drafter" / "drafter.safetensors").write_bytes(b"\x00" * 100)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" * 1000)
    env = environment({"gguf": gguf, "drafter": tmp_path / "drafter", "hub": "org/model", "tiny": tiny_llama, "none": None})
    assert ENV_KEYS <= set(env) and env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cores"] >= 1 and isinstance(env["cpu"], str) and env["cpu"]
    assert env["commit"] is None or len(env["commit"]) == 40
    assert env["artifacts"]["gguf"] == {"path": str(gguf), "sha256": hashlib.sha256(b"GGUF" * 1000).hexdigest()}
    assert env["artifacts"]["drafter"]["files"] == {
        "drafter.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
        "drafter.safetensors": hashlib.sha256(b"\x00" * 100).hexdigest()}
    assert env["artifacts"]["hub"] == {"path": "org/model", "sha256": None}  # not a local file: named, not hashed
    assert env["artifacts"]["tiny"]["sha256"] is None and "none" not in env["artifacts"]


class _ByteTokenizer:
    """One id per character, enough for the benchmark loop on a 96-token model."""

    chat_template = None
    eos_token_id = 95
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        return {"input_ids": torch.tensor([[ord(c) % 96 for c in text]])}


def test_the_sweep_runs_on_validation_prompts_disjoint_from_the_benchmark_and_says_so(context_llama, monkeypatch):
    from celeris.speculative import new_drafter
    from celeris.speculative.prompts import EVAL_PROMPTS, VALIDATION_PROMPTS

    sweep = _script("speculative_sweep")
    rows = sweep.validation_rows(2)
    assert [r["prompt"] for r in rows] == list(VALIDATION_PROMPTS[:2])
    drafter = new_drafter(context_llama, torch.arange(96), seed=0)
    res = sweep.sweep(context_llama, _ByteTokenizer(), drafter, rows[:1], [(1, 3, False), (2, 3, False)], max_new_tokens=4,
                      repeats=2, progress=False)
    assert res["prompt_split"] == "validation" and res["settings"]["prompt_source"].startswith("validation split")
    assert [e["name"] for e in res["engines"]] == ["hf-generate", "celeris-plain", "redrafter-w1-l3", "redrafter-w2-l3"]
    for e in res["engines"]:
        for fig in (e["tokens_per_second"], e["speedup"], e["vs_celeris_plain"]):
            assert len(fig["runs"]) == 2 and fig["min"] <= fig["median"] <= fig["max"]
    chosen = max(res["engines"][2:], key=lambda e: e["vs_celeris_plain"]["median"])
    assert res["chosen"]["name"] == chosen["name"] and ENV_KEYS <= set(res["environment"])
    # a validation prompt that is also a benchmark prompt stops the sweep before it runs
    monkeypatch.setattr(sweep, "VALIDATION_PROMPTS", (EVAL_PROMPTS[3], *VALIDATION_PROMPTS))
    with pytest.raises(CelerisError, match="1 validation prompts are benchmark prompts"):
        sweep.validation_rows(2)


def _docs(n: int = 12):
    from celeris.corpora import Document

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [Document(f"d{i}", " ".join(words[(i + j) % len(words)] * (1 + j % 3) for j in range(60)) + ".\n" * 3)
            for i in range(n)]


def test_curation_scale_times_every_run_in_each_pass_and_checks_identity():
    res = _script("curation_scale").curation_scale(_docs(), [1], repeats=2)
    assert [r["run"] for r in res["rows"]] == ["in-process", "datatrove local, 1 worker"]
    for r in res["rows"]:
        d, s = r["documents_per_second"], r["seconds"]
        assert r["identical"] and len(d["runs"]) == len(s["runs"]) == 2
        assert d["runs"] == pytest.approx([res["documents"] / x for x in s["runs"]])
        assert d["median"] == pytest.approx(statistics.median(d["runs"]))
    assert res["rows"][1]["vs_1_worker"]["runs"] == pytest.approx([1.0, 1.0])


def test_bench_data_times_curation_repeatedly():
    from celeris.curation.bench import DataBenchConfig, curation_speed

    docs = _docs()
    speed = curation_speed(docs, DataBenchConfig(repeats=3))
    d, s = speed["documents_per_second"], speed["curation_seconds"]
    assert len(d["runs"]) == len(s["runs"]) == 3 and d["runs"] == pytest.approx([len(docs) / x for x in s["runs"]])
    with pytest.raises(CelerisError, match="--repeats"):
        curation_speed(docs, DataBenchConfig(repeats=0))


def test_bench_federated_json_carries_the_environment_and_says_its_times_are_one_run(tmp_path):
    import json

    from celeris.federated.apps import FederationSpec
    from celeris.federated.bench import _finish

    out = _finish({"centralized": {"final_val_loss": 2.0, "wall_seconds": 3.0}}, {}, 4, 6, 15, FederationSpec(), "nano",
                  0.3, 0, tmp_path / "fl.json")
    saved = json.loads((tmp_path / "fl.json").read_text())
    assert ENV_KEYS <= set(saved["environment"]) and "one run" in saved["settings"]["timing"]
    assert out["settings"]["threads"] == torch.get_num_threads()


def test_bench_calm_generation_speed_is_a_spread_and_the_speedup_is_taken_run_by_run(tmp_path):
    import textwrap

    from celeris.calm.artifacts import resolve
    from celeris.calm.bench import bench_calm

    corpus = tmp_path / "corpus"  # a few standard-library modules: tokenizing all of python-stdlib takes ~20 s
    corpus.mkdir()
    for f in sorted(Path(textwrap.__file__).parent.glob("*.py"))[:60]:
        (corpus / f.name).write_text(f.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    torch.set_num_threads(1)
    r = bench_calm(tmp_path / "out", resolve("calm:ae"), str(corpus), steps=2, stages=1, batch_size=2, seq_len=16,
                   eval_tokens=64, gen_tokens=8, repeats=2)
    b, c = r["baseline"]["generation_tokens_per_second"], r["calm"]["generation_tokens_per_second"]
    assert len(b["runs"]) == len(c["runs"]) == 2 and r["repeats"] == 2
    assert r["ratios"]["generation_speedup"]["runs"] == pytest.approx([x / y for x, y in zip(c["runs"], b["runs"], strict=True)])
    assert r["calm"]["generation_steps"] == 2 and r["baseline"]["generation_steps"] == 8  # ceil(8 / K=4) vs 8
    assert ENV_KEYS <= set(r["environment"]) and r["environment"]["artifacts"]["autoencoder"]["files"]
