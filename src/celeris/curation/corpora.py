"""`package-docs`: an English prose corpus that every machine with Python packages has offline.

The documentation that installed distributions ship: the long description (README) in each
`*.dist-info/METADATA`, LICENSE/COPYING/NOTICE files, and `.md`/`.rst`/`.txt` files inside packages,
plus README/text files under /usr/share/doc. It is real, messy prose of the kind curation is for:
many identical licence texts (exact duplicates), near-identical READMEs of sibling packages,
numeric data files and changelogs next to well-written documentation. Its content depends on what is
installed, so benchmarks record its document count and size.
"""

from __future__ import annotations

import sysconfig
from email.parser import Parser
from pathlib import Path

from celeris.corpora import Corpus, Document, load_corpus

PROSE_CORPUS = "package-docs"
_DOC_SUFFIXES = {".md", ".rst", ".txt"}
_MIN_BYTES, _MAX_BYTES = 500, 2_000_000


def _read(path: Path, skipped: list[tuple[str, str]]) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        skipped.append((str(path), f"unreadable: {exc.strerror or exc}"))
    except UnicodeDecodeError as exc:
        skipped.append((str(path), f"not UTF-8 (byte {exc.start})"))
    return None


def _metadata_body(text: str) -> str:
    """The long description of a METADATA file (its body, or a `Description:` header)."""
    msg = Parser().parsestr(text)
    body = msg.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    return str(msg.get("Description", ""))


def package_docs_corpus(roots: list[Path] | None = None) -> Corpus:
    """Collect the `package-docs` corpus from site-packages (and /usr/share/doc) of this interpreter."""
    paths = sysconfig.get_paths()
    roots = roots or sorted({Path(paths["purelib"]), Path(paths["platlib"]), Path("/usr/share/doc")})
    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            try:
                if not f.is_file() or f.is_symlink() or not _MIN_BYTES <= f.stat().st_size <= _MAX_BYTES:
                    continue
            except OSError:
                continue
            rel = f.relative_to(root)
            name = f.name.upper()
            is_meta = name == "METADATA" and rel.parts[0].endswith(".dist-info")
            is_legal = name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")) and f.suffix.lower() in _DOC_SUFFIXES | {""}
            is_doc = f.suffix.lower() in _DOC_SUFFIXES or name.startswith("README")
            if not (is_meta or is_legal or is_doc) or "__pycache__" in rel.parts:
                continue
            text = _read(f, skipped)
            if text is None:
                continue
            if is_meta:
                text = _metadata_body(text)
            if not text.strip():
                continue
            doc_id = f"{root.name}/{rel.as_posix()}"
            if doc_id in seen:
                continue
            seen.add(doc_id)
            docs.append(Document(doc_id, text, rel.parts[0].split("-")[0]))
    return Corpus(PROSE_CORPUS, docs, skipped)


def resolve_corpus(spec: str | Corpus) -> Corpus:
    """`load_corpus`, plus the `package-docs` prose corpus."""
    if isinstance(spec, Corpus):
        return spec
    if spec == PROSE_CORPUS:
        c = package_docs_corpus()
        if not c.documents:
            from celeris.errors import CelerisError

            raise CelerisError("found no package documentation on this machine for the package-docs corpus")
        return c
    return load_corpus(spec)
