"""Quiet third-party import noise on the `celeris` command.

Importing torch, transformers, Flower and their optional extras prints warnings that have nothing to
do with the user's command (torchao's "Failed to load ...so", torch's "Enum subclass" deprecations,
typer's click deprecations) ahead of the real message. An error must be the only line a user has to
read, so the command silences third-party warnings and log records below ERROR unless `-v` /
`--verbose` (before the subcommand) or CELERIS_VERBOSE=1 asks for them. Library users importing
`celeris` from Python are left alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

VERBOSE_ENV = "CELERIS_VERBOSE"
VERBOSE_FLAGS = ("-v", "--verbose")


def is_verbose(argv: Sequence[str]) -> bool:
    """-v/--verbose among the options before the subcommand, or CELERIS_VERBOSE set to a true value."""
    if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    for arg in argv:
        if not arg.startswith("-"):
            return False
        if arg in VERBOSE_FLAGS:
            return True
    return False


def silence_third_party(argv: Sequence[str] | None = None) -> bool:
    """Ignore warnings raised outside Celeris and log records below ERROR; returns whether it did."""
    argv = sys.argv[1:] if argv is None else argv
    if is_verbose(argv):
        return False
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"celeris(\.|$)")
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return True


def quiet_torch_logs() -> None:
    """torch configures its own loggers at import (the root logger's level does not reach them): lower them to
    ERROR too. Called once torch is imported, only where `silence_third_party` applied."""
    import torch._logging

    if not os.environ.get("TORCH_LOGS"):  # a user's explicit TORCH_LOGS wins
        torch._logging.set_logs(all=logging.ERROR)


def running_as_cli() -> bool:
    """True in the `celeris` console script or `python -m celeris` (before any heavy import has run)."""
    if sys.argv and Path(sys.argv[0]).name == "celeris":
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return "-m" in orig and orig[orig.index("-m") + 1:][:1] == ["celeris"]
