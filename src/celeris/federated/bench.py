"""`celeris bench federated`: centralized training on the union vs federations, side by side.

Equal total client compute, two centralized peers on the union of the clients' shards (the same
blocks), with the same cosine learning-rate decay:
- `centralized`: one worker, rounds × clients × local_steps optimiser steps of a client's batch size
  (the most sequential steps the compute buys);
- `centralized-sync`: fully synchronous data-parallel training, rounds × local_steps steps of
  clients × batch_size blocks: the same global batch per update as the federation averages, the
  comparator of DiLoCo's parity claim (spec §6).
Every run is scored on the same held-out `report` blocks, disjoint from the `validator` blocks the
validator strategy selects with. Then 1 poisoned client of 4 for FedAvg vs the validator strategy.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import torch

from celeris.federated.apps import (
    FederationSpec,
    blocks_of,
    build_model,
    client_blocks,
    load_initial_weights,
    validation_set,
)
from celeris.report import environment
from celeris.validate import FiniteFloatRange


def pretrain_public(spec: FederationSpec, steps: int, path: Path) -> Path:
    """A warm start: train the global model `steps` steps on the corpus's `test` split, which no client
    and no validator ever sees (public data), and save it as safetensors at `path`."""
    from celeris.compute import training_flops_per_token
    from celeris.corpora import load_corpus
    from celeris.io import save_tensors
    from celeris.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    public = blocks_of([d.text for d in load_corpus(spec.corpus, "test").documents], spec.seq_len, 2_000_000)
    model = build_model(spec.size, spec.seq_len, spec.seed)
    cfg = TrainConfig(max_steps=steps, batch_size=spec.batch_size, lr=spec.lr, warmup_steps=10, eval_every=10**9,
                      log_every=10**9, progress=False, seed=spec.seed + 1)
    with tempfile.TemporaryDirectory(prefix="celeris-fl-pretrain-") as tmp:
        Trainer(model, public, None, Path(tmp), cfg, flops_per_token=training_flops_per_token(model, spec.seq_len),
                export_fn=None).train(resume=False).raise_if_interrupted()
    save_tensors(path, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    return path


def centralized(spec: FederationSpec, synchronous: bool = False) -> dict[str, Any]:
    """The peer: one model trained on the union of every client's shard at the federation's compute.

    `synchronous`: the clients' batches are pooled into one global batch per step (clients × batch_size
    blocks, rounds × local_steps steps) instead of one client-sized batch per step."""
    from flwr.app import ArrayRecord

    from celeris.compute import training_flops_per_token
    from celeris.federated.validator import Scorer
    from celeris.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    union = torch.cat([client_blocks(spec, c) for c in range(spec.clients)])
    model = build_model(spec.size, spec.seq_len, spec.seed)
    if spec.init_path:
        load_initial_weights(model, spec.init_path)
    steps = spec.rounds * spec.local_steps * (1 if synchronous else spec.clients)
    batch = spec.batch_size * (spec.clients if synchronous else 1)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=spec.lr, min_lr_ratio=spec.min_lr_ratio,
                      warmup_steps=0, eval_every=10**9, log_every=10**9, progress=False, seed=spec.seed)
    scorer = Scorer(build_model(spec.size, spec.seq_len, spec.seed), validation_set(spec, "report"))
    init_loss, _ = scorer.score(ArrayRecord(model.state_dict()))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="celeris-fl-central-") as tmp:
        res = Trainer(model, union, None, Path(tmp), cfg, flops_per_token=training_flops_per_token(model, spec.seq_len),
                      export_fn=None).train(resume=False).raise_if_interrupted()
    loss, bpc = scorer.score(ArrayRecord(model.state_dict()))
    return {"initial_val_loss": init_loss, "final_val_loss": loss, "final_val_bpc": bpc, "steps": res.steps, "flops": res.flops,
            "seconds": time.perf_counter() - t0, "bytes_per_round": 0}


def bench_federated(clients: int = 4, rounds: int = 6, local_steps: int = 15, alpha: float = 0.3,
                    size: str = "nano", seed: int = 0, out_json: str | Path | None = None,
                    warm_steps: int = 0, only_warm: bool = False) -> dict[str, Any]:
    """Run every configuration once (fixed seeds) and return {name: summary} plus the goal checks.

    `warm_steps > 0` adds a warm-started comparison (federated fine-tuning): the global model first
    trains `warm_steps` steps on public data (the corpus's test split), then centralized and FedAvg
    (IID, non-IID) continue from it on the clients' data at equal compute. `only_warm` runs just those."""
    from celeris.federated.simulation import simulate

    base = FederationSpec(clients=clients, rounds=rounds, local_steps=local_steps, size=size, seed=seed)
    poison = [clients - 1]
    runs: dict[str, FederationSpec | None] = {
        "centralized": None,
        "centralized-sync": None,
        "fedavg-iid": base,
        f"fedavg-dirichlet:{alpha:g}": replace(base, partition=f"dirichlet:{alpha:g}"),
        f"fedprox-dirichlet:{alpha:g}": replace(base, partition=f"dirichlet:{alpha:g}", strategy="fedprox"),
        "validated-iid": replace(base, strategy="validated"),
        "fedavg-iid-poison1": replace(base, poison=poison),
        "validated-iid-poison1": replace(base, strategy="validated", poison=poison),
    }
    if warm_steps > 0:
        work = Path(tempfile.mkdtemp(prefix="celeris-fl-bench-"))
        t0 = time.perf_counter()
        init = str(pretrain_public(base, warm_steps, work / "public-init.safetensors"))
        click.echo(f"pretrained on public data: {warm_steps} steps ({time.perf_counter() - t0:.0f} s)", err=True)
        warm = replace(base, init_path=init)
        warm_runs = {"centralized-warm": ("central", warm), "fedavg-iid-warm": ("fed", warm),
                     f"fedavg-dirichlet:{alpha:g}-warm": ("fed", replace(warm, partition=f"dirichlet:{alpha:g}"))}
        if only_warm:
            runs = {}
        runs.update({k: (None if kind == "central" else v) for k, (kind, v) in warm_runs.items()})
    results: dict[str, Any] = {}
    for name, spec in runs.items():
        if name == "centralized-warm":
            t0 = time.perf_counter()
            results[name] = centralized(warm)
            results[name]["wall_seconds"] = time.perf_counter() - t0
            click.echo(f"{name:<28} val loss {results[name]['final_val_loss']:.4f}", err=True)
            continue
        t0 = time.perf_counter()
        results[name] = centralized(base, synchronous=name.endswith("-sync")) if spec is None else simulate(spec)
        results[name]["wall_seconds"] = time.perf_counter() - t0
        click.echo(f"{name:<28} val loss {results[name]['final_val_loss']:.4f}  ({results[name]['wall_seconds']:.0f} s)", err=True)
    goals: dict[str, Any] = {}
    if "centralized-warm" in results:
        cw = results["centralized-warm"]["final_val_loss"]
        goals["warm_start_val_loss"] = results["centralized-warm"]["initial_val_loss"]
        shutil.rmtree(work, ignore_errors=True)
        goals["iid_gap_vs_centralized_warm"] = results["fedavg-iid-warm"]["final_val_loss"] / cw - 1
        goals["noniid_gap_vs_centralized_warm"] = results[f"fedavg-dirichlet:{alpha:g}-warm"]["final_val_loss"] / cw - 1
    if only_warm:
        return _finish(results, goals, clients, rounds, local_steps, base, size, alpha, seed, out_json)
    c = results["centralized"]["final_val_loss"]
    cs = results["centralized-sync"]["final_val_loss"]
    goals.update({
        "iid_gap_vs_centralized_sync": results["fedavg-iid"]["final_val_loss"] / cs - 1,
        "noniid_gap_vs_centralized_sync": results[f"fedavg-dirichlet:{alpha:g}"]["final_val_loss"] / cs - 1,
        "iid_gap_vs_centralized": results["fedavg-iid"]["final_val_loss"] / c - 1,
        "noniid_gap_vs_centralized": results[f"fedavg-dirichlet:{alpha:g}"]["final_val_loss"] / c - 1,
        "fedprox_noniid_gap_vs_centralized": results[f"fedprox-dirichlet:{alpha:g}"]["final_val_loss"] / c - 1,
        "poisoned_client_weight_validated": results["validated-iid-poison1"]["client_weights"][str(poison[0])],
        "poisoned_client_weight_fedavg": results["fedavg-iid-poison1"]["client_weights"][str(poison[0])],
        "validated_poison_vs_clean": results["validated-iid-poison1"]["final_val_loss"] / results["validated-iid"]["final_val_loss"] - 1,
        "fedavg_poison_vs_clean": results["fedavg-iid-poison1"]["final_val_loss"] / results["fedavg-iid"]["final_val_loss"] - 1,
    })
    goals["iid_within_5pct"] = goals["iid_gap_vs_centralized"] <= 0.05
    goals["iid_within_5pct_of_sync"] = goals["iid_gap_vs_centralized_sync"] <= 0.05
    goals["validator_poison_weight_below_10pct"] = goals["poisoned_client_weight_validated"] < 0.10
    goals["validator_poison_loss_within_5pct"] = goals["validated_poison_vs_clean"] <= 0.05
    goals["fedavg_degrades_under_poison"] = goals["fedavg_poison_vs_clean"] > 0.0
    return _finish(results, goals, clients, rounds, local_steps, base, size, alpha, seed, out_json)


def _finish(results, goals, clients, rounds, local_steps, base, size, alpha, seed, out_json) -> dict[str, Any]:
    out = {"environment": environment(),
           "settings": {"clients": clients, "rounds": rounds, "local_steps": local_steps, "batch_size": base.batch_size,
                        "seq_len": base.seq_len, "size": size, "alpha": alpha, "seed": seed,
                        "threads": torch.get_num_threads(),
                        "timing": "wall_seconds and seconds are one run's cost each (the goals compare losses, not "
                                  "speeds); no speed figure or ratio is derived from them"},
           "results": results, "goals": goals}
    if out_json is not None:
        from celeris.io import save_results

        save_results(Path(out_json), out)
    return out


def format_table(out: dict[str, Any]) -> str:
    rows = ["| run | final val loss | bpc | gap vs centralized | gap vs centralized-sync | rounds | bytes/round | poisoned weight | rejected rounds |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        ref = "centralized-warm" if name.endswith("-warm") else "centralized"
        c = out["results"][ref]["final_val_loss"] if ref in out["results"] else float("nan")
        cs = out["results"]["centralized-sync"]["final_val_loss"] if "centralized-sync" in out["results"] and ref == "centralized" else float("nan")
        pw = ", ".join(f"{r['client_weights'][str(p)]:.3f}" for p in r.get("poisoned", [])) or "-"
        rows.append(f"| {name} | {r['final_val_loss']:.4f} | {r['final_val_bpc']:.3f} | {r['final_val_loss'] / c - 1:+.1%} | "
                    f"{r['final_val_loss'] / cs - 1:+.1%} | "
                    f"{len(r.get('rounds', [])) or '-'} | {r['bytes_per_round'] / 1e6:.2f} MB | {pw} | "
                    f"{r.get('rejected_rounds', '-')} |")
    return "\n".join(rows)


@click.command("federated")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(2, 64))
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1, 1000))
@click.option("--local-steps", default=15, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--alpha", default=0.3, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Dirichlet concentration of the non-IID runs.")
@click.option("--size", default="nano", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--warm-steps", default=0, show_default=True, type=click.IntRange(0, 10**6),
              help="Also compare from a model pretrained this many steps on public data (the test split).")
@click.option("--only-warm", is_flag=True, help="Run only the warm-started comparison.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write all results here.")
def bench_federated_cmd(clients, rounds, local_steps, alpha, size, seed, warm_steps, only_warm, json_out) -> None:
    """Centralized vs federated (IID, non-IID) at equal compute; FedAvg vs validator with a poisoned client."""
    from celeris.io import check_output_path

    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    out = bench_federated(clients, rounds, local_steps, alpha, size, seed, json_out, warm_steps, only_warm)
    click.echo(format_table(out))
    click.echo(json.dumps(out["goals"], indent=2))
