"""Raw vs curated over several seeds: a table and a JSON summary from `celeris bench data --json` files.

One `bench data` run is one seed: which documents fill the budget, the tokenizer's training order,
the validation blocks and the model's initialisation all follow it, so a single run's "FLOPs saved"
carries the luck of its draw. Run the bench once per seed (they are independent processes, one
thread each, so two fit on two cores), then summarise:

    for s in 0 1 2; do OMP_NUM_THREADS=1 celeris bench data --corpus python-stdlib --size nano \\
        --no-augment --no-transfer --budget-steps 600 --eval-every 30 --eval-batches 4 --seed $s \\
        --json runs/data-s$s.json; done
    python benchmarks/data_seeds.py benchmarks/data_seeds_stdlib.json runs/data-s*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise(paths: list[str]) -> dict:
    rows = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        for corpus, c in r["corpora"].items():
            raw, cur = c["runs"]["raw"], c["runs"]["curated"]
            saved = c["comparison"]["curated"]["flops_saved_vs_raw"]
            rows.append({"file": p, "corpus": corpus, "seed": r["config"]["seed"], "budget_steps": r["config"]["budget_steps"],
                         "size": r["config"]["size"], "raw_best": raw["best_val_loss"], "curated_best": cur["best_val_loss"],
                         "curated_minus_raw": cur["best_val_loss"] - raw["best_val_loss"],
                         "curated_flops_saved_vs_raw": saved,
                         "raw_heldout_raw": raw["raw_heldout_loss_of_best"], "raw_heldout_curated": cur["raw_heldout_loss_of_best"]})
    diffs = [r["curated_minus_raw"] for r in rows]
    reached = [r["curated_flops_saved_vs_raw"] for r in rows if r["curated_flops_saved_vs_raw"] is not None]
    return {"runs": rows, "curated_minus_raw_mean": statistics.mean(diffs) if diffs else None,
            "curated_minus_raw_sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "seeds_where_curated_reached_raw_best": len(reached), "seeds": len(rows),
            "flops_saved_where_reached": reached}


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/data_seeds.py OUT.json BENCH_DATA.json [BENCH_DATA.json ...]")
    s = summarise(sys.argv[2:])
    print(f"{'corpus':<15}{'seed':>5}{'raw best':>10}{'curated':>10}{'cur-raw':>9}{'FLOPs saved':>13}")
    for r in s["runs"]:
        saved = "not reached" if r["curated_flops_saved_vs_raw"] is None else f"{r['curated_flops_saved_vs_raw']:.1%}"
        print(f"{r['corpus']:<15}{r['seed']:>5}{r['raw_best']:>10.3f}{r['curated_best']:>10.3f}{r['curated_minus_raw']:>+9.3f}{saved:>13}")
    if s["curated_minus_raw_sd"] is not None:
        print(f"curated - raw best loss: {s['curated_minus_raw_mean']:+.3f} ± {s['curated_minus_raw_sd']:.3f} (mean ± sd over seeds)")
    Path(sys.argv[1]).write_text(json.dumps(s, indent=2) + "\n")


if __name__ == "__main__":
    main()
