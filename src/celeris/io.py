"""Atomic writes: a file or directory either appears whole under its final name or not at all.

Every artifact Celeris writes (model caches, checkpoints, reports, JSON) goes through these helpers,
so an interrupted or failed write never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from celeris.errors import CelerisError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `path`
    keeps whatever it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CelerisError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CelerisError(f"{what} {path} is not valid JSON: {exc}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (contiguous copies; shared storage is not allowed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CelerisError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CelerisError(f"{what} {path} is corrupt or not a safetensors file ({_first_line(exc)})") from None


def check_output_path(path: str | os.PathLike, kind: str = "file", what: str = "--out",
                      inputs: tuple | list = ()) -> Path:
    """Check, before any work, that an output file or directory can be written where the user asked.

    `kind` is "file" or "dir". An existing path of the other kind, a missing parent that cannot be
    created (a file in the way), a location this process cannot write, and a path equal to one of the
    command's `inputs` are all one-line errors.
    Writability is probed by creating and removing a temporary file in the nearest existing folder,
    which is what the atomic writes will do later (permission bits alone mislead, e.g. for root).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path).expanduser()
    if not str(path).strip():
        raise CelerisError(f"{what} is empty")
    for src in inputs:  # writing results over the command's own input would destroy it
        if src is not None and Path(src).expanduser().resolve() == path.resolve():
            raise CelerisError(f"{what} {path} is also an input of this command; choose another path")
    if kind == "file" and (path.is_dir() or str(path).endswith(os.sep)):
        raise CelerisError(f"{what} {path} is a directory; give a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise CelerisError(f"{what} {path} is a file; give a directory")
    folder = path if kind == "dir" and path.is_dir() else path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CelerisError(f"{what} {path} cannot be created: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".celeris-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CelerisError(f"{what} {path} cannot be written: {existing} is not writable ({exc.strerror})") from None
    return path


def save_results(path: str | os.PathLike, obj: Any, what: str = "results") -> Path:
    """Write a finished run's JSON; if `path` fails this late, save it in the temp folder and say where.

    Output paths are checked up front (`check_output_path`), but a disk can fill or a folder vanish
    during a long run; the results must never be lost to that.
    """
    try:
        return write_json(path, obj)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"celeris-{Path(path).stem or 'results'}-{os.getpid()}.json"
        write_json(fallback, obj)
        raise CelerisError(f"could not write {what} to {path} ({exc.strerror or exc}); they were saved to {fallback}") from None


def state_dict_differences(expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every way saved `tensors` differ from the `expected` shapes: missing, unexpected, mis-shaped.

    torch's own `load_state_dict` error puts its details after a header line, so a one-line message
    built from it says only that something differs; this says what.
    """
    diffs = [f"{k} missing" for k in expected if k not in tensors]
    diffs += [f"{k} unexpected" for k in tensors if k not in expected]
    diffs += [f"{k} has shape {tuple(tensors[k].shape)}, expected {tuple(expected[k])}" for k in expected
              if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    return diffs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file"):
    """Yield `(line_number, object)` for each non-blank line; a bad line is an error naming its number.

    Undecodable bytes, invalid JSON and non-object lines all raise `CelerisError("PATH:N: ...")`.
    """
    path = Path(path)
    if not path.is_file():
        raise CelerisError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        for no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CelerisError(f"{path}:{no}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(obj, dict):
                raise CelerisError(f"{path}:{no}: each line must be a JSON object")
            yield no, obj


# ---- training run directories ------------------------------------------------------------------------
# Written first into a run directory Celeris creates: a run stopped before its first checkpoint (Ctrl-C
# in a set-up step, a crash, a kill) is still recognised as ours, so the same command resumes it.
RUN_MARKER = ".celeris-run"
# What a trainer leaves once it has started: a run holding any of these is worth resuming.
TRAINER_FILES = ("log.jsonl", "checkpoint")


def _holds_any(out_dir: Path, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(next(out_dir.glob(p), None) is not None for p in patterns)


def check_run_dir(out_dir: str | os.PathLike, evidence: tuple[str, ...] = TRAINER_FILES) -> None:
    """Refuse a file, or a folder that holds something other than a Celeris run (its marker or one of
    the `evidence` glob patterns), even with --overwrite, which only ever replaces a run; touches nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CelerisError(f"{out_dir} is a file; --out must be a directory")
    if (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / RUN_MARKER).exists()
            and not _holds_any(out_dir, evidence)):
        raise CelerisError(f"{out_dir} exists and is not a Celeris training run; choose another --out")


@contextlib.contextmanager
def run_dir(out_dir: str | os.PathLike, overwrite: bool = False,
            evidence: tuple[str, ...] = TRAINER_FILES) -> Iterator[bool]:
    """Create (or, with `overwrite`, empty) the run directory and mark it; yields True if this call made it.

    Call it once every option has been checked (and `check_run_dir` passed). If the body stops before
    the run holds any of the `evidence` glob patterns (Ctrl-C in a set-up step, an error), a folder this
    call created goes away again; an older one keeps its marker and resumes.
    """
    out = Path(out_dir)
    if overwrite and out.exists():
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()
    try:
        yield created
    except BaseException:
        if created and not _holds_any(out, evidence):
            shutil.rmtree(out, ignore_errors=True)
        raise
