"""Demo section: federated training with a validator, from the shipped benchmark (no training here).

The numbers come from `celeris bench federated` (shipped as
`celeris/artifacts/federated/bench-federated.json`, command in docs/federated.md): validation loss per
round for centralized vs FedAvg (IID, non-IID) vs the validator with one poisoned client of four, and
each client's contribution weight. The section also shows, live, how the stdlib corpus is shared
among four clients under a non-IID Dirichlet partition (a second or two)."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parents[1] / "artifacts" / "federated" / "bench-federated.json"


def demo_section(ctx) -> None:
    from celeris.federated.bench import format_table
    from celeris.federated.cli import federate_partition
    from celeris.io import read_json
    from celeris.report import bar_plot, line_plot

    bench = read_json(SHIPPED, "shipped federated benchmark")
    res, s = bench["results"], bench["settings"]
    ctx.report.section("Federated training with a validator (Flower + FLock-style scoring)")
    ctx.report.text(
        f"{s['clients']} clients train a {s['size']} Llama on disjoint shards of the Python standard library, "
        f"{s['rounds']} Flower rounds of {s['local_steps']} local steps each; the centralized runs spend the same "
        "total compute on the union: one worker with a client's batch (4x the sequential steps), and fully synchronous "
        "data-parallel training with the federation's global batch. In the poisoned runs the last client trains on shuffled tokens and sends its "
        "update scaled x4. The validator scores every update on held-out files (loss, bits per character), "
        "excludes clients whose leave-one-out contribution is negative, and keeps the previous model when a round "
        "does not improve. Measured with `celeris bench federated` (shipped JSON; no training in this section).")
    central = res["centralized"]["final_val_loss"]
    series = {name: ([0] + [x["round"] for x in r["rounds"]], [r["initial_val_loss"]] + [x["val_loss"] for x in r["rounds"]])
              for name, r in res.items() if r.get("rounds")}
    series["centralized (end)"] = ([0, s["rounds"]], [central, central])
    if "centralized-sync" in res:
        sync = res["centralized-sync"]["final_val_loss"]
        series["centralized, synchronous (end)"] = ([0, s["rounds"]], [sync, sync])
    ctx.report.image(line_plot(series, "round", "validation loss", "Validation loss per round"), "loss per round")
    poisoned = res["validated-iid-poison1"]
    ctx.report.image(bar_plot({f"client {c}" + (" (poisoned)" if int(c) in poisoned["poisoned"] else ""): w
                               for c, w in poisoned["client_weights"].items()},
                              "mean aggregation weight", "Validator: contribution weights, 1 of 4 poisoned"),
                     "client weights")
    ctx.report.pre(format_table(bench))
    rows = [{"round": x["round"], "accepted": x["accepted"], "val loss": round(x["val_loss"], 4),
             **{f"c{c} contribution": round(v.get("contribution", 0.0), 3) for c, v in x["clients"].items()},
             **{f"c{c} weight": round(v.get("weight", 0.0), 2) for c, v in x["clients"].items()}}
            for x in poisoned["rounds"]]
    ctx.report.table(rows)
    shards = federate_partition("python-stdlib", 4, "dirichlet:0.3", 0)
    ctx.report.text("Who holds what under dirichlet:0.3 (live): documents, characters, largest sources.")
    ctx.report.table([{"client": x["client"], "documents": x["documents"], "characters": x["characters"],
                       "top sources": ", ".join(f"{k} {v:.0%}" for k, v in x["top_sources"].items())} for x in shards])
    for name, r in res.items():
        print(f"  {name:<26} val loss {r['final_val_loss']:.4f}")
    ctx.summary["federated"] = {"goals": bench["goals"], "client_weights_validated_poison1": poisoned["client_weights"],
                                "final_val_loss": {n: r["final_val_loss"] for n, r in res.items()}}
