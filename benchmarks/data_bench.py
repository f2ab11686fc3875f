"""Raw vs curated vs curated+augmented training at one FLOPs budget, early stopping, transfer vs scratch.

    OMP_NUM_THREADS=1 python benchmarks/data_bench.py --json bench_data.json

is the same as `celeris bench data --json bench_data.json` (this script only forwards its arguments);
see docs/curation.md for the figures and the exact commands that produced them.
"""

from __future__ import annotations

import sys

from celeris.cli import main

if __name__ == "__main__":
    main(["bench", "data", *sys.argv[1:]])
