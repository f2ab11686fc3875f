"""The deployment path: a SuperLink and two SuperNodes on loopback run one round of the same apps."""

from __future__ import annotations

import subprocess


def _own_processes(roots: set[int]) -> list[str]:
    """Live processes this test started: the sessions of the `roots` it spawned (each in its own session)
    and of the SuperExec processes those launched in sessions of their own (`--parent-pid ROOT`).
    Nothing else on the machine is counted."""
    rows = []
    for line in subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout.splitlines():
        pid, sid, stat, *args = line.split(None, 3)
        if not stat.startswith("Z"):  # a zombie has exited already (waiting for a parent that may be a non-reaping init)
            rows.append((int(pid), int(sid), args[0] if args else ""))
    sessions = set(roots)
    for pid, sid, args in rows:
        parts = args.split()
        if "--parent-pid" in parts[:-1] and int(parts[parts.index("--parent-pid") + 1]) in roots:
            sessions |= {pid, sid}
    return [f"{pid} {args}" for pid, sid, args in rows if sid in sessions or pid in sessions]


def test_loopback_deployment_finishes_one_round_and_cleans_up(tmp_path, monkeypatch):
    from celeris.federated import deployment
    from celeris.federated.deployment import run_loopback

    roots: set[int] = set()
    alive_before_stop: list[list[str]] = []

    class RecordingPopen(subprocess.Popen):  # the SuperLink and SuperNodes, each started in a new session
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("start_new_session"):
                roots.add(self.pid)

    def stop(procs, real_stop=deployment._stop):
        alive_before_stop.append(_own_processes(roots))
        real_stop(procs)

    monkeypatch.setattr(deployment.subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(deployment, "_stop", stop)

    corpus = tmp_path / "corpus"
    for pkg in range(4):
        (corpus / f"pkg{pkg}").mkdir(parents=True)
        for i in range(25):
            (corpus / f"pkg{pkg}" / f"m{i}.py").write_text(
                "".join(f"def f{pkg}_{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    summary = run_loopback({"corpus": str(corpus), "rounds": 1, "local-steps": 2, "seq-len": 32, "batch-size": 4,
                            "val-blocks": 4, "strategy": "validated"}, clients=2, timeout=360, work_dir=tmp_path / "run")
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]["clients"]) == {"0", "1"}  # both SuperNodes sent an update
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert (tmp_path / "run" / "server-out" / "model" / "model.safetensors").is_file()
    assert len(roots) == 3 and len(alive_before_stop[0]) >= 3  # SuperLink + 2 SuperNodes were running, seen as ours
    assert _own_processes(roots) == []  # every SuperLink/SuperNode/SuperExec/ClientApp process is gone
