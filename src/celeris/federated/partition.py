"""Split a Celeris corpus among federated clients: IID, Dirichlet over sources, or by natural source.

Every scheme assigns each training document to exactly one client (partitions are disjoint and
cover the documents they were given), and is a pure function of (documents, num_clients, scheme,
seed): the same call on another machine gives the same partition, which is what lets each
SuperNode rebuild its own shard locally from `partition-id` without anyone shipping data.

Schemes (`parse_partition` reads them from text):
- `iid`: documents shuffled with the seed and dealt round-robin.
- `dirichlet:A`: the non-IID split of Hsu et al. (2019) with documents' `source` as the label: for
  each source, client shares p ~ Dir(A·1) and the source's documents are cut by those shares.
  Small A (0.1) gives each client a few sources; large A (100) approaches IID.
- `source`: natural partition (e.g. stdlib top-level package): whole sources are dealt to clients,
  largest first, each to the client with the fewest characters so far.

`flwr-datasets` has the same partitioners over a Hugging Face `Dataset`; Celeris corpora are lists
of `Document`s with a `source`, so the 20-line versions here avoid converting every corpus.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from celeris.corpora import Document
from celeris.errors import CelerisError

MAX_CLIENTS = 64


@dataclass(frozen=True)
class PartitionScheme:
    """`kind` is iid | dirichlet | source; `alpha` is the Dirichlet concentration."""

    kind: str
    alpha: float | None = None

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def parse_partition(spec: str | PartitionScheme) -> PartitionScheme:
    """`iid`, `source`, or `dirichlet:A` with A > 0; anything else is a clear error."""
    if isinstance(spec, PartitionScheme):
        return spec
    text = str(spec).strip().lower()
    if text in ("iid", "source"):
        return PartitionScheme(text)
    kind, _, arg = text.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise CelerisError(f"cannot parse partition {spec!r}: write dirichlet:A with a number A > 0, e.g. dirichlet:0.5") from None
        if not (alpha > 0 and np.isfinite(alpha)):
            raise CelerisError(f"cannot parse partition {spec!r}: the Dirichlet concentration must be a finite number > 0")
        return PartitionScheme("dirichlet", alpha)
    raise CelerisError(f"cannot parse partition {spec!r}: choose iid, source, or dirichlet:A (e.g. dirichlet:0.5)")


def _key(doc: Document, seed: int) -> bytes:
    # A seeded hash of the id orders documents independently of how the corpus listed them.
    return hashlib.sha1(f"{seed}:{doc.id}".encode()).digest()


def partition_documents(documents: list[Document], num_clients: int, scheme: str | PartitionScheme = "iid",
                        seed: int = 0) -> list[list[Document]]:
    """Disjoint shards `[num_clients][docs]` of `documents` under `scheme` (deterministic per seed)."""
    sch = parse_partition(scheme)
    if not 1 <= num_clients <= MAX_CLIENTS:
        raise CelerisError(f"the number of clients must be in [1, {MAX_CLIENTS}], got {num_clients}")
    if len(documents) < num_clients:
        raise CelerisError(f"{len(documents)} documents cannot be split among {num_clients} clients")
    docs = sorted(documents, key=lambda d: _key(d, seed))
    shards: list[list[Document]] = [[] for _ in range(num_clients)]
    if sch.kind == "iid":
        for i, d in enumerate(docs):
            shards[i % num_clients].append(d)
    elif sch.kind == "dirichlet":
        rng = np.random.default_rng(seed)
        by_source: dict[str, list[Document]] = defaultdict(list)
        for d in docs:
            by_source[d.source].append(d)
        for source in sorted(by_source):
            group = by_source[source]
            shares = rng.dirichlet(np.full(num_clients, sch.alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(group)).astype(int)
            for c, part in enumerate(np.split(np.arange(len(group)), cuts)):
                shards[c].extend(group[i] for i in part)
    else:  # natural source partition
        by_source = defaultdict(list)
        for d in docs:
            by_source[d.source].append(d)
        if len(by_source) < num_clients:
            raise CelerisError(f"the corpus has {len(by_source)} sources, fewer than {num_clients} clients; use iid or dirichlet:A")
        sizes = {s: sum(len(d.text) for d in g) for s, g in by_source.items()}
        load = [0] * num_clients
        for s in sorted(by_source, key=lambda s: (-sizes[s], s)):
            c = min(range(num_clients), key=lambda i: (load[i], i))
            shards[c].extend(by_source[s])
            load[c] += sizes[s]
    # Dirichlet can leave a client empty; give it the last document of the largest shard so every
    # client can train (still disjoint).
    for c in range(num_clients):
        if not shards[c]:
            donor = max(range(num_clients), key=lambda i: len(shards[i]))
            shards[c].append(shards[donor].pop())
    return shards


def partition_summary(shards: list[list[Document]]) -> list[dict]:
    """Per client: documents, characters, and its three largest sources with their character share."""
    out = []
    for c, shard in enumerate(shards):
        chars: dict[str, int] = defaultdict(int)
        for d in shard:
            chars[d.source] += len(d.text)
        total = sum(chars.values()) or 1
        top = sorted(chars.items(), key=lambda kv: -kv[1])[:3]
        out.append({"client": c, "documents": len(shard), "characters": total,
                    "top_sources": {s: round(n / total, 3) for s, n in top}})
    return out
