"""What benchmarks and `celeris demo` write: the environment record, repeated measurements as a median
with min–max, and a self-contained HTML report (plots embedded as PNG).

Every benchmark JSON carries `environment(...)` (commit, dirty flag, CPU, cores, threads, versions, the
sha256 of each artefact it used) and reports each speed or time figure as `spread(runs)`:
`{"median", "min", "max", "runs"}` over at least one repeat after a warm-up (`--repeats`, default 5).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celeris.errors import CelerisError
from celeris.info import cpu_name
from celeris.io import atomic_write_text

REPEATS = 5  # timed repeats after a warm-up, the default of every benchmark


def check_repeats(repeats: int, option: str = "--repeats") -> int:
    """`repeats` if it is a whole number ≥ 1, else a clear error naming the option."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CelerisError(f"{option} must be a whole number of at least 1 (timed runs after a warm-up), got {repeats!r}")
    return repeats


def spread(runs: Sequence[float]) -> dict[str, Any]:
    """A figure measured in several runs: `{"median", "min", "max", "runs"}`."""
    runs = [float(x) for x in runs]
    if not runs:
        raise CelerisError("a measured figure needs at least one run")
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def ratio(num: Mapping[str, Any], den: Mapping[str, Any]) -> dict[str, Any]:
    """`num / den` run by run, as a spread: two figures timed in the same passes (interleaved), so a change in
    the machine's load during a pass falls on both and cancels in that pass's ratio."""
    return spread([a / b for a, b in zip(num["runs"], den["runs"], strict=True)])


def rate(work: Callable[[], float], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """`work()` returns how many units it did (tokens, documents); the returned call does the work once and
    returns units per second of that call."""
    def run() -> float:
        t0 = clock()
        units = work()
        return units / (clock() - t0)
    return run


def interleaved(runs: Mapping[str, Callable[[], float]], repeats: int = REPEATS, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Each call returns one measurement (e.g. `rate(...)`). `warmup` passes whose results are dropped, then
    `repeats` passes; every call runs once per pass, the order rotated by one each pass so that drift on the
    machine falls on all alike. Returns `{name: spread(...)}` in the order of `runs`."""
    check_repeats(repeats)
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            runs[n]()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(runs[n]())
    return {n: spread(v) for n, v in out.items()}


def format_spread(fig: Mapping[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    """`median (min–max)`, e.g. `95.7 (93.1–97.0)`; `-` for a missing figure."""
    if not fig:
        return "-"
    m, lo, hi = (fig[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (kept per process by path, size and mtime: a large GGUF is read once)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def artifact_record(source: Any) -> dict[str, Any]:
    """Where an artefact came from and the sha256 of its bytes.

    `source`: a file (`{"path", "sha256"}`), a directory (`{"path", "files": {relative path: sha256}}`, every
    file under it), a loaded Hugging Face model (its local directory, or its hub id and commit), or a name
    that is not on disk (a hub id: `{"path", "sha256": None}`)."""
    if hasattr(source, "name_or_path") and hasattr(source, "config"):  # a loaded transformers model
        rec = artifact_record(source.name_or_path or "(built in memory)")
        if "files" not in rec and rec["sha256"] is None and getattr(source.config, "_commit_hash", None):
            rec["hub_commit"] = source.config._commit_hash
        return rec
    p = Path(str(source)).expanduser()
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        return {"path": str(p), "files": {str(f.relative_to(p)): sha256_file(f) for f in files}}
    return {"path": str(source), "sha256": None}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(artifacts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record every benchmark JSON carries: commit (and whether the tree had uncommitted changes), the
    machine (CPU model, cores, usable cores, torch threads, load average at the start), versions, and
    `artifacts` `{name: file, directory or loaded model}` as `artifact_record`s (`None` values are left out)."""
    import importlib.util

    import torch
    import transformers

    commit = _git("rev-parse", "HEAD") or None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    out: dict[str, Any] = {
        "commit": commit, "dirty": bool(status) if status is not None else None,
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    if importlib.util.find_spec("llama_cpp") is not None:
        from importlib.metadata import version

        out["llama_cpp_python"] = version("llama-cpp-python")
    out["artifacts"] = {k: artifact_record(v) for k, v in (artifacts or {}).items() if v is not None}
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def line_plot(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str = "",
              logx: bool = False) -> str:
    """Lines `{label: (xs, ys)}` as a base64 PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return figure_png(fig)


def bar_plot(values: dict[str, float], ylabel: str, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(list(values), list(values.values()), color="#3b7dd8")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    ax.grid(alpha=0.3, axis="y")
    return figure_png(fig)


@dataclass
class Report:
    """Sections of HTML in order; `write` produces one standalone file."""

    title: str
    parts: list[str] = field(default_factory=list)

    def section(self, heading: str) -> None:
        self.parts.append(f"<h2>{html.escape(heading)}</h2>")

    def text(self, paragraph: str) -> None:
        self.parts.append(f"<p>{html.escape(paragraph)}</p>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def image(self, png_b64: str, alt: str) -> None:
        self.parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64}">')

    def write(self, path: str | Path) -> Path:
        style = ("body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
                 "pre{background:#f5f5f5;padding:.8em;white-space:pre-wrap}img{max-width:100%}")
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")
        return atomic_write_text(path, doc)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
