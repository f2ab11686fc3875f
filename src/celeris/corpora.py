"""Text corpora: the built-in `python-stdlib` corpus, text files, directories, JSONL, and `datasets`.

Every corpus is a list of `Document`s with a stable id and a deterministic train/validation/test
split by document (a hash of its id), so the same file always lands in the same split.

Corpus specs accepted by `load_corpus`:
- `python-stdlib`: the running interpreter's standard-library `.py` files (found via `sysconfig`);
- a `.txt`/`.md`/… file (one document) or a directory (every UTF-8 text file below it);
- a `.jsonl` file with a `text` field per line (`id` and `source` optional);
- `hf:NAME[:CONFIG]`: a Hugging Face `datasets` dataset with a `text` column (its real loading
  path; offline it works for datasets already in the local cache).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from celeris.errors import CelerisError
from celeris.io import iter_jsonl

BUILTIN_CORPORA = ("python-stdlib",)
SPLITS = ("train", "validation", "test")
# Fractions of documents (by id hash) in each split.
SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".html", ".htm", ".csv", ".json", ".tex", ".c", ".h", ""}


@dataclass(frozen=True)
class Document:
    """One document: `id` is stable across runs, `source` names where it came from (a package, a file)."""

    id: str
    text: str
    source: str = ""


def split_of(doc_id: str) -> str:
    """The split a document id belongs to (deterministic; independent of the other documents)."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "test"


@dataclass
class Corpus:
    """A named list of documents; `skipped` lists files that were unreadable (path, reason)."""

    name: str
    documents: list[Document]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    def split(self, name: str) -> Corpus:
        if name not in SPLITS:
            raise CelerisError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return Corpus(f"{self.name}:{name}", [d for d in self.documents if split_of(d.id) == name], self.skipped)

    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    @property
    def characters(self) -> int:
        return sum(len(d.text) for d in self.documents)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text(path: Path, skipped: list[tuple[str, str]]) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        skipped.append((str(path), f"unreadable: {exc.strerror or exc}"))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        skipped.append((str(path), f"not UTF-8 (byte {exc.start})"))
        return None


def _stdlib_corpus() -> Corpus:
    root = stdlib_root()
    docs, skipped = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "site-packages" or "__pycache__" in rel.parts:
            continue
        text = _read_text(path, skipped)
        if text is None or not text.strip():
            continue
        source = rel.parts[0].removesuffix(".py")
        docs.append(Document(rel.as_posix(), text, source))
    return Corpus("python-stdlib", docs, skipped)


def _jsonl_corpus(path: Path) -> Corpus:
    docs: list[Document] = []
    for lineno, obj in iter_jsonl(path, "corpus file"):
        if not isinstance(obj.get("text"), str):
            raise CelerisError(f"{path}:{lineno}: a JSONL corpus line needs a string field 'text'")
        docs.append(Document(str(obj.get("id", f"{path.name}:{lineno}")), obj["text"], str(obj.get("source", path.stem))))
    return Corpus(path.stem, docs)


def _directory_corpus(path: Path) -> Corpus:
    docs, skipped = [], []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or f.suffix.lower() not in _TEXT_SUFFIXES:
            continue
        if f.suffix == ".jsonl":
            continue
        text = _read_text(f, skipped)
        if text is None or not text.strip():
            continue
        docs.append(Document(rel.as_posix(), text, rel.parts[0] if len(rel.parts) > 1 else path.name))
    return Corpus(path.name, docs, skipped)


def _datasets_corpus(spec: str) -> Corpus:
    import datasets

    _, _, rest = spec.partition(":")
    name, _, config = rest.partition(":")
    if not name:
        raise CelerisError(f"a datasets corpus is written hf:NAME[:CONFIG], got {spec!r}")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:
        raise CelerisError(f"could not load dataset {name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "text" not in ds.column_names:
        raise CelerisError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    docs = [Document(f"{name}:{i}", t, name) for i, t in enumerate(ds["text"]) if isinstance(t, str) and t.strip()]
    return Corpus(name, docs)


def load_corpus(spec: str, split: str | None = None) -> Corpus:
    """Load a corpus by spec (see module docstring); `split` picks train/validation/test."""
    spec = str(spec)
    if spec == "python-stdlib":
        corpus = _stdlib_corpus()
    elif spec.startswith(("hf:", "datasets:")):
        corpus = _datasets_corpus(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CelerisError(
                f"corpus not found: {spec} (a path, hf:NAME, or a built-in: {', '.join(BUILTIN_CORPORA)})"
            )
        if path.is_dir():
            corpus = _directory_corpus(path)
        elif path.suffix == ".jsonl":
            corpus = _jsonl_corpus(path)
        else:
            skipped: list[tuple[str, str]] = []
            text = _read_text(path, skipped)
            if text is None:
                raise CelerisError(f"cannot read corpus file {path}: {skipped[0][1]}")
            corpus = Corpus(path.stem, [Document(path.name, text, path.stem)] if text.strip() else [])
    if not corpus.documents:
        skipped = getattr(corpus, "skipped", None) or []
        why = ""
        if skipped:
            reasons = sorted({r.split(" (")[0].split(":")[0] for _, r in skipped})
            why = f" ({len(skipped)} file(s) skipped as {' or '.join(reasons)}, e.g. {skipped[0][0]})"
        raise CelerisError(f"corpus {spec} has no documents{why}")
    return corpus.split(split) if split else corpus


def corpus_stats(corpus: Corpus, tokenizer=None) -> dict[str, int]:
    """Documents, characters and (with a tokenizer) tokens of a corpus."""
    stats = {"documents": len(corpus), "characters": corpus.characters}
    if tokenizer is not None:
        n = 0
        texts = corpus.texts()
        for i in range(0, len(texts), 256):
            enc = tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]
            n += sum(len(e) for e in enc)
        stats["tokens"] = n
    return stats
