"""Data augmentation that keeps the data valid: code stays parseable Python, prose keeps its words.

Code (`augment_code`): an AST rewrite that
- renames each function's local variables (assignment targets, loop and `with` targets; never
  parameters, whose names callers may pass by keyword, never globals/nonlocals, and not in functions
  that call `locals`/`vars`/`eval`/`exec`) to fresh names, consistently inside the function;
- drops each docstring with probability `docstring_dropout`;
- drops comments (the code is re-emitted with `ast.unparse`).
The result is checked with `ast.parse`; a file that does not parse (or contains constructs
`ast.unparse` cannot round-trip) is returned unchanged.

Prose (`augment_prose`): re-wraps every paragraph to a random line width. The words and their order
are unchanged; the model learns that hard line breaks in plain text carry no meaning.
Both are off by default; `augment_documents` adds one augmented copy per document.
"""

from __future__ import annotations

import ast
import random
import re
import textwrap

from celeris.corpora import Document
from celeris.curation.rules import is_code

NAME_POOL = ("value", "item", "result", "data", "node", "key", "index", "obj", "entry", "count", "text", "buf",
             "elem", "part", "acc", "cur", "tmp", "val", "res", "out", "arg", "rec", "token", "chunk", "field")
_DYNAMIC = {"locals", "vars", "eval", "exec", "globals"}


def _all_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.keyword) and n.arg:
            names.add(n.arg)
    return names


def _local_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str] | None:
    """Names stored in `fn` that are safe to rename; None if the function uses dynamic scoping."""
    params = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
    params |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
    stored: set[str] = set()
    declared: set[str] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _DYNAMIC:
            return None
        if isinstance(n, ast.Global | ast.Nonlocal):
            declared.update(n.names)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            stored.add(n.id)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda) and n is not fn:
            # names of nested scopes' parameters are their own; leave functions with nested scopes alone
            return None
    return stored - params - declared


class _Renamer(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id in self.mapping:
            node.id = self.mapping[node.id]
        return node


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def augment_code(source: str, rng: random.Random, rename_prob: float = 0.5, docstring_dropout: float = 0.5) -> str:
    """An augmented variant of Python `source` (see module docstring); always parseable."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    taken = _all_names(tree)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and body \
                and _is_docstring(body[0]) and rng.random() < docstring_dropout:
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and rng.random() < rename_prob:
            local = _local_names(node)
            if not local:
                continue
            mapping = {}
            for old in sorted(local):
                choices = [n for n in NAME_POOL if n not in taken]
                new = rng.choice(choices) if choices else f"{old}_{len(taken)}"
                taken.add(new)
                mapping[old] = new
            _Renamer(mapping).visit(node)
    try:
        out = ast.unparse(ast.fix_missing_locations(tree))
        ast.parse(out)
    except (SyntaxError, ValueError, RecursionError):
        return source
    return out + "\n"


def augment_prose(text: str, rng: random.Random, min_width: int = 50, max_width: int = 100) -> str:
    """Re-wrap every paragraph (blank-line separated) to one random width in [min_width, max_width]."""
    width = rng.randint(min_width, max_width)
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(textwrap.fill(" ".join(p.split()), width=width) for p in paras if p.strip()) + "\n"


def augment_documents(docs: list[Document], seed: int = 0, copies: int = 1) -> list[Document]:
    """The documents followed by `copies` augmented copies of each (ids `ID#augK`)."""
    rng = random.Random(seed)
    out = list(docs)
    for k in range(1, copies + 1):
        for d in docs:
            text = augment_code(d.text, rng) if is_code(d.id) else augment_prose(d.text, rng)
            out.append(Document(f"{d.id}#aug{k}", text, d.source))
    return out
