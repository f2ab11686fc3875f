"""How much faster can two worker processes be than one on this machine? The ceiling of any 2-worker speed-up.

    python benchmarks/parallel_ceiling.py [--seconds 2] [--repeats 5] [--json OUT]

Two CPU-bound kernels, each run by 1 process and by 2 processes at once (started and waiting at a barrier
before the clock starts, so process start-up is not counted): a pure-Python loop and the curation's own
stage-1 kernel (datasketch MinHash of stdlib text, what `curate --workers` shards). Each process does as many
units of work as it can in `--seconds`; the figure is units/s of all processes together, and the ratio
2 processes / 1 process is the most a 2-worker pipeline could gain here with no serial part and no overhead.
Virtual CPUs that share a physical core (or a host that is busy) give less than 2. Median (min-max) of
`--repeats` passes after a warm-up pass; nothing else should be running.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread


def python_loop() -> None:
    s = 0
    for i in range(20_000):
        s += (i * i) ^ (i >> 3)


def minhash_kernel():
    from datasketch import MinHash

    from celeris.curation.corpora import resolve_corpus

    texts = [d.text for d in resolve_corpus("python-stdlib").documents[:64]]

    def run() -> None:
        for t in texts[:4]:
            m = MinHash(num_perm=128, seed=1)
            w = t.split()
            m.update_batch([" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))])

    return run


KERNELS = {"python loop": lambda: python_loop, "datasketch MinHash (curation stage 1)": minhash_kernel}


def _worker(kernel: str, seconds: float, barrier, out) -> None:
    fn = KERNELS[kernel]()
    fn()
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    out.put(n / (time.perf_counter() - t0))


def units_per_second(kernel: str, procs: int, seconds: float) -> float:
    """Units of `kernel` per second of `procs` processes running at once (their sum)."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(kernel, seconds, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(out.get() for _ in ps)
    for p in ps:
        p.join()
    return total


def ceiling(seconds: float = 2.0, repeats: int = REPEATS) -> dict[str, Any]:
    check_repeats(repeats)
    rows = []
    for kernel in KERNELS:
        runs: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats + 1):  # pass 0 warms up; the order alternates pass by pass
            for procs in ((1, 2) if r % 2 else (2, 1)):
                v = units_per_second(kernel, procs, seconds)
                if r:
                    runs[procs].append(v)
        one, two = spread(runs[1]), spread(runs[2])
        rows.append({"kernel": kernel, "one_process": one, "two_processes": two, "speedup": ratio(two, one)})
    return {"seconds": seconds, "repeats": repeats, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="Seconds each process works per pass.")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    env = environment()
    res = ceiling(a.seconds, a.repeats)
    print(f"{env['usable_cores']} usable cores; median (min-max) of {a.repeats} passes of {a.seconds:g} s")
    print(f"{'kernel':<40} {'1 process /s':>20} {'2 processes /s':>20} {'speed-up':>18}")
    for r in res["rows"]:
        print(f"{r['kernel']:<40} {format_spread(r['one_process']):>20} {format_spread(r['two_processes']):>20} "
              f"{format_spread(r['speedup'], 2):>18}")
    if a.json:
        from celeris.io import write_json

        write_json(a.json, {"environment": env, **res})


if __name__ == "__main__":
    main()
