"""Curation on datatrove's local executor at 1 and 2 workers against the in-process pipeline.

    python benchmarks/curation_scale.py [--corpus python-stdlib] [--workers 1 2] [--repeats 5] [--json OUT]

One warm-up pass (the in-process run whose kept set and audit are the reference, then each executor run, whose
output is checked against it), then --repeats timed passes, every run once per pass in rotated order. Prints
documents/s per run as median (min-max) and each run's speed over 1 worker pass by pass; the JSON carries the
environment record (CPU, cores, load average at the start: a shared machine makes the speed figures
meaningless, re-measure on an idle one). Loading the corpus is not timed, as in `curate`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from celeris.curation.corpora import resolve_corpus
from celeris.curation.executors import curate_on_executor
from celeris.curation.pipeline import CurationConfig, curate_documents
from celeris.errors import CelerisError
from celeris.io import write_json
from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread


def curation_scale(docs: list, workers: list[int], repeats: int = REPEATS) -> dict[str, Any]:
    """The in-process pipeline and the datatrove executor at each worker count on `docs`: identity with the
    in-process run (from the warm-up pass) and documents/s over `repeats` timed passes."""
    check_repeats(repeats)
    cfg = CurationConfig()
    ref = curate_documents(docs, cfg)
    ref_audit = [asdict(r) for r in ref.removals]
    runs = {("in-process", 1): lambda: curate_documents(docs, cfg)}
    runs |= {(f"datatrove local, {w} worker{'s' * (w > 1)}", w): (lambda w=w: curate_on_executor(docs, cfg, workers=w))
             for w in workers}
    names = list(runs)
    identical = {names[0]: True}
    for key in names[1:]:  # warm-up pass of the executor runs, and their identity check
        res = runs[key]()
        identical[key] = [d.id for d in res.kept] == [d.id for d in ref.kept] and [asdict(r) for r in res.removals] == ref_audit
    secs: dict[tuple[str, int], list[float]] = {k: [] for k in names}
    for r in range(repeats):
        k = r % len(names)
        for key in names[k:] + names[:k]:
            secs[key].append(runs[key]().seconds)
    rows = [{"run": name, "workers": w, "seconds": spread(secs[name, w]),
             "documents_per_second": spread([len(docs) / s for s in secs[name, w]]), "identical": identical[name, w]}
            for name, w in names]
    one = next((r for r in rows[1:] if r["workers"] == 1), None)
    for r in rows[1:]:
        if one is not None:
            r["vs_1_worker"] = ratio(r["documents_per_second"], one["documents_per_second"])
    return {"documents": len(docs), "kept": len(ref.kept), "repeats": repeats, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=REPEATS, help="Timed passes after the warm-up pass.")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    env = environment()  # before the runs: the load average says how busy the machine was
    docs = resolve_corpus(a.corpus).documents
    try:
        res = curation_scale(docs, a.workers, a.repeats)
    except CelerisError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{a.corpus}: {res['documents']} documents, {res['kept']} kept; {env['usable_cores']} usable cores, load average "
          f"{env['load_average'][0] if env['load_average'] else '?'} at start; median (min-max) of {a.repeats} passes")
    print(f"{'run':<28} {'seconds':>20} {'docs/s':>22} {'vs 1 worker':>20} identical")
    for r in res["rows"]:
        print(f"{r['run']:<28} {format_spread(r['seconds'], 2):>20} {format_spread(r['documents_per_second']):>22} "
              f"{format_spread(r.get('vs_1_worker'), 2):>20} {r['identical']}")
    if a.json:
        write_json(a.json, {"environment": env, "corpus": a.corpus, **res})


if __name__ == "__main__":
    main()
