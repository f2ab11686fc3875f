"""Collaborative training without sharing data: Flower federation with a FLock-style validator.

- `partition`: IID / Dirichlet-over-sources / natural-source shards of any Celeris corpus.
- `apps`: the Flower `ClientApp` (local training with the shared `Trainer`, FedProx term) and
  `ServerApp` (FedAvg, FedProx, DiLoCo-style server momentum, validated).
- `validator`: `ValidatedFedAvg`, the validator that scores every update (loss, bits per character),
  computes leave-one-out contributions, excludes harmful clients and rejects regressing rounds.
- `simulation`: `simulate(spec)` on Flower's Simulation Runtime with an in-process backend.
- `deployment`: the same apps across processes (SuperLink + SuperNodes + `flwr run`).
"""

from celeris.federated.apps import FederationSpec
from celeris.federated.partition import parse_partition, partition_documents
from celeris.federated.simulation import simulate

__all__ = ["FederationSpec", "parse_partition", "partition_documents", "simulate"]
