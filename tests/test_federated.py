"""Federated training: partitions, aggregation, the validator, and a Flower simulation end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from celeris.corpora import Document
from celeris.errors import CelerisError
from celeris.federated.apps import FederationSpec, check_architecture
from celeris.federated.partition import parse_partition, partition_documents
from celeris.federated.validator import RoundLog, ValidatedFedAvg, weighted_mean


def _docs(n: int = 300, sources: int = 10) -> list[Document]:
    return [Document(f"pkg{i % sources}/f{i}.py", f"text {i} " * (1 + i % 7), f"pkg{i % sources}") for i in range(n)]


# ---- partitioning -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "dirichlet:100", "source"])
def test_partitions_are_disjoint_complete_and_deterministic_per_seed(scheme):
    docs = _docs()
    a = partition_documents(docs, 4, scheme, seed=1)
    b = partition_documents(list(reversed(docs)), 4, scheme, seed=1)  # input order must not matter
    ids = [d.id for shard in a for d in shard]
    assert len(ids) == len(set(ids)) == len(docs)
    assert [[d.id for d in s] for s in a] == [[d.id for d in s] for s in b]
    assert all(len(s) > 0 for s in a)
    c = partition_documents(docs, 4, scheme, seed=2)
    if scheme != "source":  # the natural partition depends only on sizes, not on the seed
        assert [[d.id for d in s] for s in a] != [[d.id for d in s] for s in c]


def test_iid_is_balanced_and_small_alpha_is_skewed_by_source():
    docs = _docs(400, 8)
    iid = partition_documents(docs, 4, "iid", seed=0)
    assert [len(s) for s in iid] == [100, 100, 100, 100]

    def max_source_share(shard):
        counts = np.bincount([int(d.source[3:]) for d in shard], minlength=8)
        return counts.max() / counts.sum()

    skewed = partition_documents(docs, 4, "dirichlet:0.05", seed=0)
    assert np.mean([max_source_share(s) for s in skewed]) > 0.5 > np.mean([max_source_share(s) for s in iid])
    natural = partition_documents(docs, 4, "source", seed=0)
    assert all(len({d.source for d in s}) == 2 for s in natural)  # 8 sources of equal size over 4 clients


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:abc", "dirichlet:-1", "dirichlet:0", "shards:3", ""])
def test_unparseable_partition_spec_is_a_clear_error(bad):
    with pytest.raises(CelerisError, match="cannot parse partition"):
        parse_partition(bad)


def test_partition_errors_on_too_many_clients():
    with pytest.raises(CelerisError, match="cannot be split"):
        partition_documents(_docs(3), 4, "iid")
    with pytest.raises(CelerisError, match="sources"):
        partition_documents(_docs(40, 2), 4, "source")


# ---- aggregation and the validator --------------------------------------------------------------
def test_weighted_mean_equals_hand_computed_mean():
    a = ArrayRecord({"w": Array(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)), "b": Array(np.array([1.0], dtype=np.float32))})
    b = ArrayRecord({"w": Array(np.array([[5.0, 6.0], [7.0, 8.0]], dtype=np.float32)), "b": Array(np.array([-3.0], dtype=np.float32))})
    out = weighted_mean([a, b], [1.0, 3.0])
    np.testing.assert_allclose(out["w"].numpy(), [[4.0, 5.0], [6.0, 7.0]])  # (1·a + 3·b) / 4
    np.testing.assert_allclose(out["b"].numpy(), [-2.0])


class _QuadraticScorer:
    """Stand-in validator: loss = ||x - target||² of a single tensor 'x'."""

    def __init__(self, target):
        self.target = np.asarray(target, dtype=np.float32)
        self.model = torch.nn.Module()
        self.model.x = torch.nn.Parameter(torch.zeros(len(target)))

    def score(self, arrays):
        loss = float(((arrays["x"].numpy() - self.target) ** 2).sum())
        return loss, loss / np.log(2)

    def loss(self, arrays):
        return self.score(arrays)[0]


def _reply(cid: int, x, n: float = 10.0) -> Message:
    from flwr.app import MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.asarray(x, dtype=np.float32))}),
                          "metrics": MetricRecord({"num-examples": n, "client-id": float(cid)})})
    msg = Message(content=content, dst_node_id=cid + 1, message_type="train")
    # A reply as the server sees it: what a Flower client sends back.
    return Message(content, reply_to=msg)


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a running Flower app need a (dummy) task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def test_validator_excludes_a_planted_bad_update_and_fedavg_mean_of_the_rest(flower_identity):
    scorer = _QuadraticScorer([1.0, 1.0])
    log = RoundLog()
    strat = ValidatedFedAvg(scorer=scorer, round_log=log, min_train_nodes=4, min_available_nodes=4)
    strat.global_arrays = ArrayRecord({"x": Array(np.zeros(2, dtype=np.float32))})
    log.start_round(1)
    replies = [_reply(0, [0.9, 1.1]), _reply(1, [1.1, 0.9], 30.0), _reply(2, [1.0, 0.8]), _reply(3, [-8.0, 9.0])]
    arrays, _ = strat.aggregate_train(1, replies)
    clients = log.current["clients"]
    assert clients["3"]["status"] == "excluded" and clients["3"]["weight"] == 0.0
    assert clients["3"]["contribution"] < 0 < min(clients[c]["contribution"] for c in "012")
    assert [clients[c]["weight"] for c in "012"] == pytest.approx([0.2, 0.6, 0.2])
    # FedAvg over the survivors, weights 10:30:10.
    np.testing.assert_allclose(arrays["x"].numpy(), [(0.9 + 3.3 + 1.0) / 5, (1.1 + 2.7 + 0.8) / 5], rtol=1e-6)
    assert log.current["accepted"] is True


def test_validator_rejects_a_round_whose_aggregate_regresses(flower_identity):
    scorer = _QuadraticScorer([0.0, 0.0])
    log = RoundLog()
    strat = ValidatedFedAvg(scorer=scorer, round_log=log, min_train_nodes=2, min_available_nodes=2)
    start = ArrayRecord({"x": Array(np.zeros(2, dtype=np.float32))})  # already optimal
    strat.global_arrays = start
    log.start_round(1)
    arrays, _ = strat.aggregate_train(1, [_reply(0, [0.5, 0.5]), _reply(1, [0.4, 0.6])])
    assert log.current["accepted"] is False
    np.testing.assert_array_equal(arrays["x"].numpy(), [0.0, 0.0])


def test_update_with_another_architecture_is_rejected_clearly(tiny_llama):
    sd = tiny_llama.state_dict()
    check_architecture(tiny_llama, ArrayRecord(sd))
    bad = dict(sd)
    bad["model.embed_tokens.weight"] = torch.zeros(50, 64)
    with pytest.raises(CelerisError, match="architecture mismatch.*embed_tokens.*shape"):
        check_architecture(tiny_llama, ArrayRecord(bad), "client 3's update")
    missing = {k: v for k, v in sd.items() if "layers.1." not in k}
    with pytest.raises(CelerisError, match="missing tensors"):
        check_architecture(tiny_llama, ArrayRecord(missing))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clients": 1}, "--clients must be in"), ({"clients": 65}, "--clients must be in"),
    ({"rounds": 0}, "--rounds must be in"), ({"rounds": 5000}, "--rounds must be in"),
    ({"partition": "dirichlet:x"}, "cannot parse partition"), ({"drop": 1.0}, "--drop"),
    ({"poison": [0, 1]}, "every client"),
])
def test_spec_out_of_range_is_a_clear_error(kwargs, match):
    with pytest.raises(CelerisError, match=match):
        FederationSpec(clients=kwargs.pop("clients", 2), **kwargs).validate()


def test_cli_reports_bad_input_as_one_line(capsys):
    from celeris.cli import main

    for args, match in [(["--clients", "0"], "--clients must be in"), (["--rounds", "0"], "--rounds must be in"),
                        (["--partition", "dirichlet:nope"], "cannot parse partition")]:
        with pytest.raises(SystemExit) as exc:
            main(["federate", "simulate", *args])
        assert exc.value.code == 2
        assert match in capsys.readouterr().err


# ---- a Flower simulation end to end -------------------------------------------------------------
SMALL = dict(clients=2, rounds=2, local_steps=3, batch_size=4, seq_len=32, val_blocks=4, max_chars_per_client=20_000)


def _tiny_data(spec, pid):
    """Client shards without reading the stdlib: disjoint synthetic 'code' per client."""
    from celeris.federated.apps import blocks_of

    text = "".join(f"def f{pid}_{i}(x):\n    return x * {i} + {pid}\n" for i in range(200))
    return blocks_of([text], spec.seq_len, None)


def _sent_records(log):
    """A client mod that records what every reply carries (the only thing that leaves a client)."""

    def audit_mod(msg, ctx, call_next):
        out = call_next(msg, ctx)
        if not out.has_error():
            log.append({name: (type(rec).__name__, {k: (getattr(v, "dtype", None), tuple(getattr(v, "shape", ())), v if isinstance(v, (int, float)) else None)
                                                      for k, v in rec.items()})
                        for name, rec in out.content.items()})
        return out

    return audit_mod


def test_two_client_two_round_simulation_sends_only_weights_and_metrics(tmp_path, monkeypatch):
    from celeris.federated import simulation
    from celeris.federated.apps import build_model

    monkeypatch.setattr("celeris.federated.apps.validation_set", _fake_validation)
    sent: list[dict] = []
    spec = FederationSpec(strategy="validated", **SMALL)
    res = simulation.simulate(spec, out_dir=tmp_path, mods=[_sent_records(sent)], data_fn=_tiny_data)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert res["final_val_loss"] < res["initial_val_loss"]
    assert set(res["client_weights"]) == {"0", "1"}
    assert sum(res["client_weights"].values()) == pytest.approx(1.0)
    # What left the clients: one ArrayRecord with exactly the model's float tensors, one MetricRecord of scalars.
    model = build_model(spec.size, spec.seq_len, spec.seed)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(sent) == 4  # 2 clients × 2 rounds
    for reply in sent:
        assert set(reply) == {"arrays", "metrics"}
        kind, arrays = reply["arrays"]
        assert kind == "ArrayRecord" and {k: s for k, (_, s, _) in arrays.items()} == expected
        assert all(str(dt) == "float32" for dt, _, _ in arrays.values())
        kind, metrics = reply["metrics"]
        assert kind == "MetricRecord" and set(metrics) == {"num-examples", "client-id", "train-loss", "local-steps", "flops", "seconds"}
    # Round log (JSONL) and the final model in safetensors.
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and "val_bpc" in lines[0]["clients"]["0"]
    from safetensors.torch import load_file

    final = load_file(tmp_path / "model" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in final.items()} == expected


def _fake_validation(spec, part):
    """Held-out text without reading the stdlib: other code for the validator's part than for the report's."""
    from celeris.federated.apps import ValidationSet, blocks_of

    line = {"validator": "def g{i}(x):\n    return x * {i} + 1\n", "report": "class K{i}:\n    size = [{i}] * 3\n"}[part]
    blocks = blocks_of(["".join(line.format(i=i) for i in range(60))], spec.seq_len, None)[: spec.val_blocks]
    return ValidationSet(blocks, int(blocks[:, 1:].numel()), int(blocks[:, 1:].numel()), [f"fake-{part}"])


def test_validator_and_report_parts_are_disjoint_halves_of_the_validation_split():
    from celeris.corpora import load_corpus
    from celeris.federated.apps import validation_set

    spec = FederationSpec(**SMALL)
    validator, report = validation_set(spec, "validator"), validation_set(spec, "report")
    held_out = {d.id for d in load_corpus(spec.corpus, "validation").documents}
    assert not set(validator.documents) & set(report.documents)
    assert set(validator.documents) | set(report.documents) == held_out
    assert abs(len(validator.documents) - len(report.documents)) <= 1
    assert validator.blocks.shape == report.blocks.shape == (spec.val_blocks, spec.seq_len)
    assert not {tuple(r) for r in validator.blocks.tolist()} & {tuple(r) for r in report.blocks.tolist()}
    with pytest.raises(CelerisError, match="held-out part"):
        validation_set(spec, "validation")


def test_reported_losses_are_measured_on_the_report_part_and_the_validator_scores_on_its_own(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from celeris.federated import simulation
    from celeris.federated.apps import build_model

    monkeypatch.setattr("celeris.federated.apps.validation_set", _fake_validation)
    spec = FederationSpec(strategy="validated", **SMALL)
    res = simulation.simulate(spec, out_dir=tmp_path, data_fn=_tiny_data)
    model = build_model(spec.size, spec.seq_len, spec.seed)

    @torch.no_grad()
    def loss_on(part):
        blocks = _fake_validation(spec, part).blocks
        return float(model(input_ids=blocks, labels=blocks).loss)

    start = (loss_on("validator"), loss_on("report"))
    assert abs(start[0] - start[1]) > 1e-5 * start[1]  # the random model already tells the two parts apart
    assert res["initial_val_loss"] == pytest.approx(start[1], rel=1e-6)
    assert res["rounds"][0]["global_val_loss_before"] == pytest.approx(start[0], rel=1e-6)
    model.load_state_dict(load_file(tmp_path / "model" / "model.safetensors"))
    end = (loss_on("validator"), loss_on("report"))
    assert end[0] != pytest.approx(end[1], rel=1e-3)
    assert res["final_val_loss"] == res["rounds"][-1]["val_loss"] == pytest.approx(end[1], rel=1e-6)
    assert res["held_out"] == {"validator": {"documents": 1, "blocks": 4}, "report": {"documents": 1, "blocks": 4}}


def test_dropped_clients_and_a_wrong_architecture_do_not_stop_the_federation(monkeypatch):
    from celeris.federated import simulation

    monkeypatch.setattr("celeris.federated.apps.validation_set", _fake_validation)
    spec = FederationSpec(strategy="fedavg", drop=0.5, seed=3, **{**SMALL, "clients": 3, "rounds": 3})
    res = simulation.simulate(spec, data_fn=_tiny_data, client_sizes={2: "tiny"})
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    errors = [e for r in res["rounds"] for e in r["errors"]]
    assert sum("architecture mismatch" in e for e in errors) >= 1  # client 2 refuses the nano weights
    assert any("dropped out" in e for e in errors)
    assert res["client_weights"]["2"] == 0.0


def test_local_dp_mod_clips_every_update(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from celeris.federated import simulation
    from celeris.federated.apps import build_model

    monkeypatch.setattr("celeris.federated.apps.validation_set", _fake_validation)
    clip = 1e-3  # tiny: the model may move at most `clip` per round (noise negligible at epsilon 1e6)
    spec = FederationSpec(strategy="fedavg", dp_clip=clip, dp_epsilon=1e6, **SMALL)
    simulation.simulate(spec, out_dir=tmp_path, data_fn=_tiny_data)
    start = build_model(spec.size, spec.seq_len, spec.seed).state_dict()
    final = load_file(tmp_path / "model" / "model.safetensors")
    moved = torch.sqrt(sum(((final[k] - start[k]) ** 2).sum() for k in start if k != "lm_head.weight"))
    assert 0 < float(moved) <= spec.rounds * clip * 1.05


def test_spec_round_trips_through_flower_run_config():
    spec = FederationSpec(clients=3, rounds=2, poison=[2], strategy="validated", dp_clip=None)
    assert FederationSpec.from_run_config(spec.to_run_config()) == spec
    # `flwr run --run-config` keys (dashes) override; poison as "0,2"; empty out-dir means none.
    flat = FederationSpec.from_run_config({"clients": 3, "local-steps": 7, "poison": "0,2", "out-dir": ""})
    assert (flat.clients, flat.local_steps, flat.poison, flat.out_dir) == (3, 7, [0, 2], None)
