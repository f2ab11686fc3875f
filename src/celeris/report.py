"""A self-contained HTML report (plots embedded as PNG) that `celeris demo` and benchmarks write."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celeris.io import atomic_write_text


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
