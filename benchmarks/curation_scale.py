"""Curation on datatrove's local executor at 1 and 2 workers against the in-process pipeline.

    python benchmarks/curation_scale.py [--corpus python-stdlib] [--workers 1 2] [--json OUT]

Prints documents/s per run and whether each run's kept set and audit equal the in-process run's; the
JSON also records the CPU count and the load average when it started (a shared machine makes the
speed figures meaningless: re-measure on an idle one). Loading the corpus is not timed, as in `curate`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from celeris.curation.corpora import resolve_corpus
from celeris.curation.executors import curate_on_executor
from celeris.curation.pipeline import CurationConfig, curate_documents
from celeris.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    load = os.getloadavg()
    docs = resolve_corpus(a.corpus).documents
    cfg = CurationConfig()
    ref = curate_documents(docs, cfg)
    ref_audit = [asdict(r) for r in ref.removals]
    rows = [{"run": "in-process", "workers": 1, "seconds": round(ref.seconds, 3),
             "documents_per_second": round(ref.documents_per_second, 1), "identical": True}]
    for w in a.workers:
        res = curate_on_executor(docs, cfg, workers=w)
        same = [d.id for d in res.kept] == [d.id for d in ref.kept] and [asdict(r) for r in res.removals] == ref_audit
        rows.append({"run": "datatrove local", "workers": w, "seconds": round(res.seconds, 3),
                     "documents_per_second": round(res.documents_per_second, 1), "identical": same})
    print(f"{a.corpus}: {len(docs)} documents, {len(ref.kept)} kept; {os.cpu_count()} CPUs, load average {load[0]:.2f} at start")
    print(f"{'run':<16} {'workers':>7} {'seconds':>8} {'docs/s':>8} identical")
    for r in rows:
        print(f"{r['run']:<16} {r['workers']:>7} {r['seconds']:>8.2f} {r['documents_per_second']:>8.1f} {r['identical']}")
    if a.json:
        write_json(a.json, {"corpus": a.corpus, "documents": len(docs), "kept": len(ref.kept), "cpus": os.cpu_count(),
                            "load_average_at_start": [round(x, 2) for x in load], "rows": rows})


if __name__ == "__main__":
    main()
