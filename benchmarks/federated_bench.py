"""Benchmark script: `python benchmarks/federated_bench.py [--json OUT]` = `celeris bench federated`.

Fixed seeds; prints the markdown table and the goal checks, writes all results as JSON."""

from celeris.federated.bench import bench_federated_cmd

if __name__ == "__main__":
    bench_federated_cmd()
