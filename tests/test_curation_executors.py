"""Curation on datatrove's executors: 1 worker, 2 workers and the in-process pipeline keep the same
documents and write the same audit; the Slurm stages are the same pipeline objects, submitted by sbatch
scripts that (run here as Slurm would run them) give the in-process output; Ray gives it too."""

from __future__ import annotations

import importlib.util
import inspect
import json
import random
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import dill
import pytest

from celeris.corpora import Document
from celeris.curation.executors import (
    EXECUTOR_CLASSES,
    SET_BY_CELERIS,
    CelerisRuleFilter,
    CelerisSignatures,
    ResolveDuplicates,
    build_executors,
    check_executor_options,
    curate_on_executor,
)
from celeris.curation.pipeline import CurationConfig, curate_documents
from celeris.errors import CelerisError
from test_curation import CODE, PROSE, PROSE_2, _near_copy

HEADER = "Licensed to the Python Software Foundation under a contributor agreement and distributed under its licence terms"


def _corpus() -> tuple[list[Document], list[str]]:
    """Every removal kind, twins in other shards than their kept document, and common boilerplate."""
    rng = random.Random(0)
    words = PROSE.split() + PROSE_2.split()
    docs = [Document("river.txt", PROSE), Document("library.txt", PROSE_2), Document("cfg.py", CODE)]
    for i in range(24):  # distinct prose, each with the licence header (common: ignored by decontamination)
        body = " ".join(rng.choice(words) for _ in range(150)).capitalize() + "."
        docs.append(Document(f"essay{i:02d}.txt", HEADER + ". " + body))
    docs += [
        Document("river_copy.txt", PROSE),  # exact twin of river.txt
        Document("river_near.txt", _near_copy(PROSE)),  # near twin
        Document("cfg_copy.py", CODE),
        Document("gen.py", "# Automatically generated file. Do not edit.\n" + CODE),
        Document("short.txt", "Too short."),
        Document("leak.txt", " ".join(rng.choice(words) for _ in range(120)) + " " + " ".join(PROSE_2.split()[:40])),
    ]
    return docs, [HEADER + " " + PROSE_2]


def _audit(res) -> list[dict]:
    return [asdict(r) for r in res.removals]


def test_two_workers_keep_the_same_documents_and_audit_as_one_worker_and_in_process():
    docs, evals = _corpus()
    cfg = CurationConfig(near_dup_threshold=0.7)  # _near_copy(PROSE) has Jaccard 0.83 with PROSE
    ref = curate_documents(docs, cfg, evals)
    assert {"exact_dedup", "near_dedup", "decontamination", "code_generated", "gopher_quality"} <= {r.rule for r in ref.removals}
    assert {r.kept_twin for r in ref.removals if r.kept_twin} == {"river.txt", "cfg.py"}
    for workers, tasks in ((1, None), (2, None), (2, 5)):
        res = curate_on_executor(docs, cfg, evals, workers=workers, tasks=tasks)
        assert [d.id for d in res.kept] == [d.id for d in ref.kept], (workers, tasks)
        assert _audit(res) == _audit(ref), (workers, tasks)
        assert res.documents_in == len(docs)


def _cli_corpus(tmp_path: Path, docs: list[Document] | None = None) -> list[str]:
    """`_corpus()` (or `docs`) as a .jsonl and its evaluation text as a file: the CLI arguments for both."""
    corpus, evals = _corpus()
    src, ev = tmp_path / "corpus.jsonl", tmp_path / "eval.txt"
    src.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs or corpus))
    ev.write_text(evals[0])
    return [str(src), "--eval", str(ev), "--tokenizer", "words", "--threshold", "0.7"]


def _assert_same_output(a: Path, b: Path) -> None:
    """corpus.jsonl and audit.jsonl byte for byte; summary.json but for its timings."""
    for name in ("corpus.jsonl", "audit.jsonl"):
        assert (a / name).read_text() == (b / name).read_text(), name
    timing = ("seconds", "documents_per_second", "token_count_seconds")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in timing} == {k: v for k, v in sb.items() if k not in timing}
    assert sa.keys() == sb.keys()


def test_cli_curate_on_the_local_executor_and_its_collect_write_what_the_in_process_run_writes(tmp_path, capsys):
    from celeris.cli import main

    args = _cli_corpus(tmp_path)
    main(["curate", *args, "--out", str(tmp_path / "a")])
    main(["curate", *args, "--out", str(tmp_path / "b"), "--executor", "local", "--workers", "2",
          "--work-dir", str(tmp_path / "work")])
    main(["curate", "--collect", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "c")])
    capsys.readouterr()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["removed"]["decontamination"] == 2
    _assert_same_output(tmp_path / "a", tmp_path / "b")
    _assert_same_output(tmp_path / "a", tmp_path / "c")


@pytest.mark.parametrize("extra, words", [
    (["--workers", "2"], "--executor local"),
    (["--executor", "local", "--workers", "0"], "--workers"),
    (["--executor", "slurm"], "--work-dir"),
    (["--executor", "slurm", "--work-dir", "W", "--executor-config", "missing.json"], "no such file"),
    (["--executor", "ray", "--executor-config", "{bad.json"], "not valid JSON"),
    (["--executor", "ray", "--executor-config", '{"address": "auto"}'], "--work-dir on a file system every node sees"),
    (["--executor", "ray", "--executor-config", "[]"], "one JSON object"),
    (["--executor", "slurm", "--work-dir", "W", "--executor-config", '{"partiton": "cpu"}'], "unknown key 'partiton'"),
    (["--executor", "ray", "--executor-config", '{"partition": "cpu"}'], "unknown key 'partition'"),
    (["--executor", "slurm", "--work-dir", "W", "--executor-config", '{"tasks": 4}'], "'tasks' is set by celeris (--tasks)"),
    (["--executor", "slurm", "--work-dir", "W", "--executor-config", '{"cpus_per_task": "2"}'], "'cpus_per_task' must be int"),
    (["--executor", "slurm", "--work-dir", "o"], "overlaps --out"),
    (["--collect", "--work-dir", "W"], "drop CORPUS"),
])
def test_cli_curate_refuses_bad_executor_options_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    from celeris.cli import main

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "c.txt"
    src.write_text(PROSE)
    for i, a in enumerate(extra):  # a config given inline is written to a file
        if extra[i - 1] == "--executor-config" and a != "missing.json":
            (tmp_path / "cfg.json").write_text(a)
            extra = [*extra[:i], "cfg.json", *extra[i + 1:]]
    with pytest.raises(SystemExit) as exc:
        main(["curate", str(src), "--out", "o", "--tokenizer", "words", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "W").exists()


def test_cli_collect_refuses_a_run_setting_and_an_unfinished_work_folder(tmp_path, capsys):
    from celeris.cli import main

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "celeris.json").write_text(json.dumps({"inputs": [], "tasks": 2}))
    for extra, words in ((["--rules", "c4_quality"], "drop --rules"), ([], "not finished (0 of 2 signature tasks")):
        with pytest.raises(SystemExit) as exc:
            main(["curate", "--collect", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "o"), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["local", "slurm", "ray"])
def test_executor_config_accepts_the_executors_keyword_arguments_less_those_celeris_sets(kind):
    params = set(inspect.signature(EXECUTOR_CLASSES[kind].__init__).parameters) - {"self"}
    accepted = sorted(params - SET_BY_CELERIS.keys() | ({"address"} if kind == "ray" else set()))
    with pytest.raises(CelerisError) as exc:
        check_executor_options(kind, {"no_such_option": 1})
    assert str(exc.value).endswith(f"unknown key 'no_such_option' for {EXECUTOR_CLASSES[kind].__name__}; "
                                   f"accepted: {', '.join(accepted)}")
    for key in sorted(params & SET_BY_CELERIS.keys()):
        with pytest.raises(CelerisError, match=f"'{key}' is set by celeris"):
            check_executor_options(kind, {key: 1})
    opts = {"local": {"start_method": "spawn", "skip_completed": False},
            "slurm": {"partition": "gpu", "time": "2:00:00", "mem_per_cpu_gb": 4, "sbatch_args": {"account": "a"},
                      "requeue_signals": ["SIGUSR1"], "venv_path": "/shared/venv/bin/activate"},
            "ray": {"address": "auto", "cpus_per_task": 2, "mem_per_cpu_gb": 0.5, "time": None}}[kind]
    assert check_executor_options(kind, opts) == opts | ({"requeue_signals": ("SIGUSR1",)} if kind == "slurm" else {})


def test_slurm_gets_the_same_two_stages(tmp_path):
    """Construction only (no Slurm here): stage 1 sharded over tasks, stage 2 one task depending on it."""
    from datatrove.executor import SlurmPipelineExecutor

    cfg = CurationConfig()
    first, resolve = build_executors("slurm", str(tmp_path), cfg, None, tasks=8, workers=4,
                                     executor_options={"partition": "cpu", "time": "0:30:00"})
    assert isinstance(first, SlurmPipelineExecutor) and isinstance(resolve, SlurmPipelineExecutor)
    assert (first.tasks, first.workers, resolve.tasks, resolve.depends) == (8, 4, 1, first)
    steps = [type(s) for s in first.pipeline]
    assert steps.count(CelerisRuleFilter) == 9 and CelerisSignatures in steps
    assert [type(s) for s in resolve.pipeline] == [ResolveDuplicates]


def test_slurm_submits_both_stages_by_sbatch_and_their_scripts_give_the_in_process_output(tmp_path, capsys, monkeypatch):
    """No Slurm here: datatrove's `launch_slurm_job` (which calls sbatch) records each script instead; then
    each array task runs what the script runs (`launch_pickled_pipeline executor.pik`, in this process)
    with the SLURM_* variables Slurm sets, stage 1 before stage 2, and `--collect` writes the output."""
    import datatrove.executor.slurm as dt_slurm

    from celeris.cli import main

    args = _cli_corpus(tmp_path)
    main(["curate", *args, "--out", str(tmp_path / "a")])
    jobs: list[tuple[str, list[str]]] = []

    def sbatch(script: str, job_id_retriever, *sbatch_args: str) -> str:
        jobs.append((script, list(sbatch_args)))
        return job_id_retriever(f"Submitted batch job {100 + len(jobs)}")

    monkeypatch.setattr(dt_slurm, "launch_slurm_job", sbatch)
    cfg = tmp_path / "slurm.json"
    cfg.write_text(json.dumps({"partition": "short", "time": "0:20:00", "cpus_per_task": 2,
                               "sbatch_args": {"account": "proj42"}}))
    work = tmp_path / "work"
    main(["curate", *args, "--out", str(tmp_path / "b"), "--executor", "slurm", "--executor-config", str(cfg),
          "--work-dir", str(work), "--tasks", "3", "--workers", "2"])
    out = capsys.readouterr().out
    assert f"celeris curate --collect --work-dir {work} --out {tmp_path / 'b'}" in out
    assert not (tmp_path / "b").exists()
    # stage 1 (array of 3, 2 at once), its stats merge, stage 2 after stage 1 succeeded, its stats merge
    (s1, a1), (m1, _), (s2, a2), (m2, _) = jobs
    for script, stage, array in ((s1, "signatures", "0-2%2"), (s2, "resolve", "0-0")):
        assert f"#SBATCH --job-name=celeris-{stage}" in script and f"#SBATCH --array={array}" in script
        for line in ("--partition=short", "--time=0:20:00", "--cpus-per-task=2", "--account=proj42"):
            assert f"#SBATCH {line}" in script
        assert script.rstrip().endswith(f"launch_pickled_pipeline {work}/logs/{stage}/executor.pik")
        assert script.rstrip().splitlines()[-1].startswith("srun ")
        if sys.prefix != sys.base_prefix:
            assert f"source {sys.prefix}/bin/activate" in script  # the jobs import Celeris from this virtual env
    assert "--dependency=afterok:101" in a2 and "merge_stats" in m1 and "merge_stats" in m2
    with pytest.raises(SystemExit):  # not run yet
        main(["curate", "--collect", "--work-dir", str(work), "--out", str(tmp_path / "b")])
    assert "not finished (0 of 3 signature tasks done" in capsys.readouterr().err

    monkeypatch.setattr(dt_slurm, "expand_slurm_nodelist", lambda nodes: [nodes])  # scontrol show hostnames
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the requeue handler (SIGUSR1) stays pytest's
    for var in ("DATATROVE_NODE_RANK", "DATATROVE_EXECUTOR", "DATATROVE_NODE_IPS", "DATATROVE_CPUS_PER_TASK",
                "DATATROVE_MEM_PER_CPU", "DATATROVE_GPUS_ON_NODE"):
        monkeypatch.setenv(var, "")  # set by each task; restored afterwards
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    for stage, tasks in (("signatures", 3), ("resolve", 1)):
        for i in range(tasks):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            with open(work / "logs" / stage / "executor.pik", "rb") as f:  # = launch_pickled_pipeline
                dill.load(f).run()
    main(["curate", "--collect", "--work-dir", str(work), "--out", str(tmp_path / "b")])
    capsys.readouterr()
    _assert_same_output(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray: pip install 'celeris[ray]'")
def test_ray_keeps_the_same_documents_and_audit_as_in_process(tmp_path, capsys):
    """A local Ray with 2 CPUs; the corpus: every removal kind plus 200 documents of python-stdlib."""
    import ray

    from celeris.cli import main
    from celeris.corpora import load_corpus

    args = _cli_corpus(tmp_path, _corpus()[0] + load_corpus("python-stdlib").documents[:200])
    main(["curate", *args, "--out", str(tmp_path / "a")])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        main(["curate", *args, "--out", str(tmp_path / "b"), "--executor", "ray", "--workers", "2", "--tasks", "3",
              "--executor-config", str(_write(tmp_path / "ray.json", {"mem_per_cpu_gb": 0.5}))])
    finally:
        ray.shutdown()
    capsys.readouterr()
    assert len((tmp_path / "a" / "corpus.jsonl").read_text().splitlines()) > 150
    _assert_same_output(tmp_path / "a", tmp_path / "b")


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path
