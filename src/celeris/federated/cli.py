"""`celeris federate simulate|partition` and `celeris bench federated`."""

from __future__ import annotations

from pathlib import Path

import click

from celeris.errors import CelerisError
from celeris.validate import FiniteFloatRange


def _poison_list(k: int, clients: int) -> list[int]:
    """--poison K corrupts the last K clients (a fixed, documented choice)."""
    if k < 0 or k >= clients:
        raise CelerisError(f"--poison must be in [0, {clients - 1}] for {clients} clients, got {k}")
    return list(range(clients - k, clients))


def federate_simulate(clients: int = 4, rounds: int = 5, partition: str = "iid", strategy: str = "fedavg",
                      poison: int = 0, drop: float = 0.0, corpus: str = "python-stdlib", size: str = "nano",
                      local_steps: int = 20, batch_size: int = 8, seq_len: int = 128, lr: float = 3e-3,
                      mu: float = 0.01, seed: int = 0, dp_clip: float | None = None, dp_epsilon: float | None = None,
                      out: str | Path | None = None, backend: str = "inprocess") -> dict:
    """Python form of `celeris federate simulate` (same names); returns the summary dict."""
    from celeris.federated.apps import MAX_ROUNDS, FederationSpec
    from celeris.federated.partition import MAX_CLIENTS, parse_partition
    from celeris.federated.simulation import simulate

    if not 2 <= clients <= MAX_CLIENTS:
        raise CelerisError(f"--clients must be in [2, {MAX_CLIENTS}], got {clients}")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise CelerisError(f"--rounds must be in [1, {MAX_ROUNDS}], got {rounds}")
    parse_partition(partition)
    spec = FederationSpec(corpus=corpus, clients=clients, rounds=rounds, partition=partition, strategy=strategy,
                          size=size, local_steps=local_steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                          proximal_mu=mu, poison=_poison_list(poison, clients), drop=drop, seed=seed,
                          dp_clip=dp_clip, dp_epsilon=dp_epsilon)
    return simulate(spec, out_dir=out, backend=backend)


def register(cli: click.Group) -> None:
    from celeris.validate import emit_json

    @cli.group()
    def federate() -> None:
        """Federated training with Flower: data stays with each client; a validator scores updates."""

    @federate.command("simulate")
    @click.option("--clients", default=4, show_default=True, type=int, help="Number of clients (2..64).")
    @click.option("--rounds", default=5, show_default=True, type=int, help="Federated rounds (1..1000).")
    @click.option("--partition", default="iid", show_default=True, help="iid | dirichlet:A | source")
    @click.option("--strategy", default="fedavg", show_default=True,
                  type=click.Choice(["fedavg", "fedprox", "diloco", "validated"]))
    @click.option("--poison", default=0, show_default=True, type=int, help="The last K clients send corrupted updates.")
    @click.option("--drop", default=0.0, show_default=True, type=FiniteFloatRange(0.0, 1.0), help="Probability a client fails a round.")
    @click.option("--corpus", "-c", default="python-stdlib", show_default=True)
    @click.option("--size", default="nano", show_default=True, help="Model size: nano|tiny|small|base.")
    @click.option("--local-steps", default=20, show_default=True, type=click.IntRange(1, 10**6))
    @click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096))
    @click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8, 8192))
    @click.option("--lr", default=3e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
    @click.option("--mu", default=0.01, show_default=True, type=FiniteFloatRange(min=0), help="FedProx proximal mu.")
    @click.option("--dp-clip", default=None, type=FiniteFloatRange(min=0, min_open=True),
                  help="Clip each update to this L2 norm and add Gaussian noise (Flower's LocalDpMod).")
    @click.option("--dp-epsilon", default=None, type=FiniteFloatRange(min=0, min_open=True))
    @click.option("--seed", default=0, show_default=True)
    @click.option("--backend", default="inprocess", show_default=True, type=click.Choice(["inprocess", "ray"]))
    @click.option("--out", "-o", default=None, type=click.Path(path_type=Path),
                  help="Write rounds.jsonl, summary.json and model/ (safetensors) here.")
    @click.option("--json", "json_out", default=None, type=click.Path(path_type=Path),
                  help="Write the summary JSON to this file ('-' for stdout).")
    def simulate_cmd(clients, rounds, partition, strategy, poison, drop, corpus, size, local_steps, batch_size,
                     seq_len, lr, mu, dp_clip, dp_epsilon, seed, backend, out, json_out) -> None:
        """Run a federation on Flower's Simulation Runtime and report loss per round and client weights."""
        from celeris.io import check_output_path, save_results

        if out is not None:
            check_output_path(out, "dir")
        if json_out is not None and str(json_out) != "-":
            check_output_path(json_out, "file", "--json")
        res = federate_simulate(clients, rounds, partition, strategy, poison, drop, corpus, size, local_steps,
                                batch_size, seq_len, lr, mu, seed, dp_clip, dp_epsilon, out, backend)
        if json_out is not None and str(json_out) == "-":
            emit_json(res)
        elif json_out is not None:
            save_results(json_out, res)
        for r in res["rounds"]:
            status = "" if r.get("accepted", True) else "  (rejected: kept previous model)"
            click.echo(f"round {r['round']:>3}: val loss {r['val_loss']:.4f}  bpc {r['val_bpc']:.3f}  "
                       f"failures {len(r.get('errors', []))}{status}", err=json_out is not None and str(json_out) == "-")
        weights = ", ".join(f"{c}: {w:.2f}" for c, w in res["client_weights"].items())
        click.echo(f"final val loss {res['final_val_loss']:.4f}; mean weights {{{weights}}}; poisoned {res['poisoned']}",
                   err=json_out is not None and str(json_out) == "-")

    @federate.command("partition")
    @click.option("--corpus", "-c", default="python-stdlib", show_default=True)
    @click.option("--clients", default=4, show_default=True, type=int)
    @click.option("--partition", default="iid", show_default=True, help="iid | dirichlet:A | source")
    @click.option("--seed", default=0, show_default=True)
    def partition_cmd(corpus, clients, partition, seed) -> None:
        """Show how the training split of CORPUS is shared among clients (JSON)."""
        emit_json(federate_partition(corpus, clients, partition, seed))

    from celeris.federated.bench import bench_federated_cmd

    cli.commands["bench"].add_command(bench_federated_cmd, "federated")


def federate_partition(corpus: str = "python-stdlib", clients: int = 4, partition: str = "iid", seed: int = 0) -> list[dict]:
    """Python form of `celeris federate partition`."""
    from celeris.corpora import load_corpus
    from celeris.federated.partition import partition_documents, partition_summary

    return partition_summary(partition_documents(load_corpus(corpus, "train").documents, clients, partition, seed))
