"""Option checks shared by the commands: finite numbers, sampling temperature, engine-only options.

Each raises `CelerisError` (one line, exit 2) before any model is loaded, so a bad value never costs
a run; the click type rejects NaN and infinity, which `click.FloatRange` lets through.
"""

from __future__ import annotations

import json
import math

import click

from celeris.errors import CelerisError


class FiniteFloatRange(click.FloatRange):
    """`click.FloatRange` that also refuses nan and ±inf (every comparison with nan is False, so a
    plain range lets `--lr nan` through to the first optimiser step)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def emit_json(obj) -> None:
    """A command's `--json` output on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str))


def check_finite(value: float, what: str, minimum: float | None = None, minimum_open: bool = False) -> float:
    """`value` as a float, finite and (optionally) above `minimum`; the error names the option."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise CelerisError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise CelerisError(f"{what} must be a finite number, got {value!r}")
    if minimum is not None and (x < minimum or (minimum_open and x == minimum)):
        raise CelerisError(f"{what} must be {'>' if minimum_open else '>='} {minimum:g}, got {value!r}")
    return x


def check_temperature(temperature: float, what: str = "--temperature") -> float:
    """A sampling temperature: finite and >= 0 (0 = greedy). nan breaks `torch.multinomial`; inf turns
    the distribution uniform and silently gives random tokens."""
    return check_finite(temperature, f"{what} (0 for greedy decoding)", minimum=0.0)


def check_engine_options(drafter: str | None, memory: str | None, beam_width: int | None = None,
                         beam_length: int | None = None, budget: str | None = None) -> None:
    """Options that belong to one engine are refused without it, not silently ignored.

    `beam_width`/`beam_length`/`budget` are None when the user did not give them (see `option_given`).
    """
    if drafter is None:
        for name, value in (("--beam-width", beam_width), ("--beam-length", beam_length)):
            if value is not None:
                raise CelerisError(f"{name} applies only with --drafter (ReDrafter); add --drafter default or leave it out")
    if memory is None and budget is not None:
        raise CelerisError("--budget applies only with --memory (a KV-memory policy); add --memory NAME or leave it out")


def check_messages(messages, where: str) -> None:
    """Chat messages: a list of objects, each with a string `role` and a string `content` (a chat
    template given anything else fails deep inside jinja2)."""
    if not isinstance(messages, list) or not messages:
        raise CelerisError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            missing = [k for k in ("role", "content") if not isinstance(m, dict) or not isinstance(m.get(k), str)]
            raise CelerisError(f"{where}: message {i} needs a string {' and '.join(map(repr, missing))}")


def check_schema(meta: dict, schema: dict[str, type], where: str) -> None:
    """A loaded JSON config has every field of `schema` with its type (ints positive, bools not ints),
    so a hand-edited artefact fails here with the field named, not deep inside a forward pass."""
    problems = []
    for key, kind in schema.items():
        value = meta.get(key)
        if key not in meta:
            problems.append(f"{key} missing")
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"{key} must be a non-negative integer, got {value!r}")
        elif kind is not int and not isinstance(value, kind):
            problems.append(f"{key} must be a {kind.__name__}, got {value!r}")
    if problems:
        raise CelerisError(f"{where} is malformed: {'; '.join(problems)}")


def option_given(ctx: click.Context, name: str) -> bool:
    """Whether the user typed option `name` (its parameter name), rather than getting its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (click.core.ParameterSource.DEFAULT,
                                                 click.core.ParameterSource.DEFAULT_MAP)
