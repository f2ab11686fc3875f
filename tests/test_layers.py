"""The package's layering, as a check that fails: import-linter's contracts (pyproject `[tool.importlinter]`) and
no import cycle between any two of Celeris's modules (function-level imports count)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def _lint(src: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package found in `src` (a copy where a test breaks a rule)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, str(src), str(ROOT / "pyproject.toml")],
                          capture_output=True, text=True, timeout=300, cwd=src)


def _cycles(package_dir: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph of `celeris` under `package_dir`."""
    code = """
import sys, json
sys.path.insert(0, sys.argv[1])
import grimp
g = grimp.build_graph("celeris")
adj = {m: sorted(g.find_modules_directly_imported_by(m)) for m in sorted(g.modules)}
index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in adj[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        group = []
        while True:
            w = stack.pop(); on.discard(w); group.append(w)
            if w == v:
                break
        if len(group) > 1:
            out.append(sorted(group))
for m in adj:
    if m not in index:
        visit(m)
print(json.dumps(out))
"""
    import json

    res = subprocess.run([sys.executable, "-c", code, str(package_dir)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_layer_contracts_hold():
    res = _lint(ROOT / "src")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "2 kept, 0 broken" in res.stdout


def test_no_import_cycles():
    assert _cycles(ROOT / "src") == []


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "celeris", dst / "celeris", ignore=shutil.ignore_patterns("__pycache__", "artifacts", "data"))
    return dst


def test_the_contract_fails_when_a_base_module_imports_a_system(tmp_path):
    """Negative control: one function-level import of a system in `generation.py` breaks the contract."""
    src = _copy(tmp_path)
    gen = src / "celeris" / "generation.py"
    gen.write_text(gen.read_text() + "\n\ndef _bad():\n    from celeris.memory import make_policy  # noqa: F401\n")
    res = _lint(src)
    assert res.returncode != 0
    assert "celeris.generation -> celeris.memory" in res.stdout


def test_a_cycle_is_found(tmp_path):
    """Negative control: `tree` importing `engine_decoding`, which imports `tree`, is a cycle."""
    src = _copy(tmp_path)
    tree = src / "celeris" / "speculative" / "tree.py"
    tree.write_text(tree.read_text() + "\n\ndef _bad():\n    from celeris.speculative import engine_decoding  # noqa: F401\n")
    assert any({"celeris.speculative.engine_decoding", "celeris.speculative.tree"} <= set(g) for g in _cycles(src))
