"""Curation on datatrove's executors: 1 worker, 2 workers and the in-process pipeline keep the same
documents and write the same audit; the Slurm stages are the same pipeline objects."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pytest

from celeris.corpora import Document
from celeris.curation.executors import (
    CelerisRuleFilter,
    CelerisSignatures,
    ResolveDuplicates,
    build_executors,
    curate_on_executor,
)
from celeris.curation.pipeline import CurationConfig, curate_documents
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


def test_cli_curate_on_the_local_executor_writes_what_the_in_process_run_writes(tmp_path, capsys):
    from celeris.cli import main

    docs, _ = _corpus()
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs))
    common = ["--tokenizer", "words", "--threshold", "0.7"]
    main(["curate", str(src), "--out", str(tmp_path / "a"), *common])
    main(["curate", str(src), "--out", str(tmp_path / "b"), *common, "--executor", "local", "--workers", "2"])
    capsys.readouterr()
    for name in ("corpus.jsonl", "audit.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    timing = ("seconds", "documents_per_second", "token_count_seconds")
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert {k: v for k, v in sa.items() if k not in timing} == {k: v for k, v in sb.items() if k not in timing}
    assert sa.keys() == sb.keys()


@pytest.mark.parametrize("extra, words", [(["--workers", "2"], "--executor local"),
                                          (["--executor", "slurm"], "build_executors"),
                                          (["--executor", "local", "--workers", "0"], "--workers")])
def test_cli_curate_refuses_bad_executor_options_before_any_work(tmp_path, capsys, extra, words):
    from celeris.cli import main

    src = tmp_path / "c.txt"
    src.write_text(PROSE)
    with pytest.raises(SystemExit) as exc:
        main(["curate", str(src), "--out", str(tmp_path / "o"), "--tokenizer", "words", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


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
