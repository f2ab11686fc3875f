"""The deployment path: a SuperLink and two SuperNodes on loopback run one round of the same apps."""

from __future__ import annotations

import subprocess


def _process_count() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(("flower-super" in line or "flwr-" in line) and "127.0.0.1" in line for line in out.splitlines())



def test_loopback_deployment_finishes_one_round_and_cleans_up(tmp_path):
    from celeris.federated.deployment import run_loopback

    corpus = tmp_path / "corpus"
    for pkg in range(4):
        (corpus / f"pkg{pkg}").mkdir(parents=True)
        for i in range(25):
            (corpus / f"pkg{pkg}" / f"m{i}.py").write_text(
                "".join(f"def f{pkg}_{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    before = _process_count()
    summary = run_loopback({"corpus": str(corpus), "rounds": 1, "local-steps": 2, "seq-len": 32, "batch-size": 4,
                            "val-blocks": 4, "strategy": "validated"}, clients=2, timeout=360, work_dir=tmp_path / "run")
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]["clients"]) == {"0", "1"}  # both SuperNodes sent an update
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert (tmp_path / "run" / "server-out" / "model" / "model.safetensors").is_file()
    assert _process_count() == before  # every SuperLink/SuperNode/ClientApp process is gone
