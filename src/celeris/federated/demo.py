"""Demo section: a 4-client federation with one poisoned client, FedAvg vs the validator, live.

Small on purpose (nano model, a few local steps, about a minute on 2 cores): it shows the validation
loss per round and each client's mean aggregation weight under both strategies."""

from __future__ import annotations

import time
from dataclasses import replace


def demo_section(ctx) -> None:
    from celeris.federated.apps import FederationSpec
    from celeris.federated.simulation import simulate
    from celeris.report import bar_plot, line_plot

    rounds = 2 if ctx.quick else 3
    base = FederationSpec(clients=4, rounds=rounds, local_steps=5, poison=[3], max_chars_per_client=100_000, val_blocks=16)
    t0 = time.perf_counter()
    runs = {name: simulate(replace(base, strategy=name), out_dir=ctx.out_dir / "federated" / name)
            for name in ("fedavg", "validated")}
    ctx.report.section("Federated training with a validator (Flower + FLock-style scoring)")
    ctx.report.text(f"4 clients train a nano Llama on disjoint shards of the standard library; client 3 is poisoned "
                    f"(shuffled tokens, update x{base.poison_scale:g}). The validator scores every update on held-out "
                    f"files (loss, bits per character), excludes clients whose leave-one-out contribution is negative "
                    f"and rejects rounds that regress. {time.perf_counter() - t0:.0f} s for both runs.")
    ctx.report.image(line_plot({name: ([0] + [x["round"] for x in r["rounds"]], [r["initial_val_loss"]] + [x["val_loss"] for x in r["rounds"]])
                                for name, r in runs.items()}, "round", "validation loss", "Loss per round, 1 of 4 clients poisoned"),
                     "validation loss per round")
    ctx.report.image(bar_plot({f"client {c}": w for c, w in runs["validated"]["client_weights"].items()},
                              "mean aggregation weight", "Validator: contribution weights"), "client weights")
    ctx.report.table([{"strategy": n, "final val loss": round(r["final_val_loss"], 4), "final bpc": round(r["final_val_bpc"], 3),
                       **{f"w{c}": round(w, 3) for c, w in r["client_weights"].items()}, "rejected rounds": str(r["rejected_rounds"])}
                      for n, r in runs.items()])
    ctx.summary["federated"] = {n: {k: r[k] for k in ("final_val_loss", "client_weights", "poisoned", "rejected_rounds")}
                                for n, r in runs.items()}
