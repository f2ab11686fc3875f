"""The deployment path: the same ServerApp/ClientApp across processes, on Flower's Deployment Engine.

`run_loopback` starts a SuperLink and N SuperNodes on 127.0.0.1 (each its own process group),
submits `deploy_app/` with `flwr run`, waits for the run to finish, and stops every process it
started. Each SuperNode gets `partition-id`/`num-partitions` as node config and rebuilds its own
shard locally; only weights and metrics cross the sockets. On separate machines, run the same three
commands by hand (docs/federated.md) with the SuperLink's address instead of 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celeris.errors import CelerisError
from celeris.io import read_json

APP_DIR = Path(__file__).parent / "deploy_app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _wait_listening(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CelerisError(f"a Flower process exited early (code {proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise CelerisError(f"nothing listens on 127.0.0.1:{port} in time")


def _detached_children(procs: list[subprocess.Popen]) -> list[int]:
    """SuperExec processes our SuperLink/SuperNodes started in their own sessions (`--parent-pid P`)."""
    mine = {str(p.pid) for p in procs}
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        parts = args.split()
        if "--parent-pid" in parts and parts.index("--parent-pid") + 1 < len(parts) and parts[parts.index("--parent-pid") + 1] in mine:
            pids.append(int(pid))
    return pids


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM then SIGKILL each started process group (SuperNodes spawn SuperExec/ClientApp children)
    and the detached SuperExec processes they launched."""
    children = _detached_children(procs)
    for pid in children:
        for sig in (signal.SIGTERM,):
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in [*(p.pid for p in procs), *children]:
        try:
            os.killpg(pid if pid in {p.pid for p in procs} else os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_loopback(run_config: dict[str, Any], clients: int = 2, timeout: float = 600.0,
                 work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `deploy_app` on a loopback SuperLink + `clients` SuperNodes; return the ServerApp's summary."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="celeris-fl-deploy-"))
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    out_dir = work / "server-out"
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout

    def start(args: list[str], log: str) -> subprocess.Popen:
        fh = open(work / log, "w")
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        procs.append(p)
        return p

    try:
        link = start([_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)], "superlink.log")
        _wait_listening(port, link, deadline)
        for c in range(clients):
            start([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                   "--port", str(_free_port()), "--node-config", f"partition-id={c} num-partitions={clients}"],
                  f"supernode{c}.log")
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in {**run_config, "clients": clients, "out-dir": str(out_dir)}.items())
        with open(work / "run.log", "w") as fh:
            r = subprocess.run([_bin("flwr"), "run", str(APP_DIR), "loopback", "--stream", "--run-config", overrides],
                               stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work,
                               timeout=max(1.0, deadline - time.monotonic()))
        if r.returncode != 0 or not (out_dir / "summary.json").is_file():
            tail = (work / "run.log").read_text()[-800:]
            raise CelerisError(f"the deployed run failed (flwr run exit {r.returncode}); log tail: {tail}")
        return read_json(out_dir / "summary.json", "federation summary")
    except subprocess.TimeoutExpired:
        raise CelerisError(f"the deployed run did not finish within {timeout:.0f} s (logs in {work})") from None
    finally:
        _stop(procs)
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + str(v).replace("'", "") + "'"
