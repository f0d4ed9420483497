"""The click parameter types of every command, in one place.

Each type parses with the library's own parser, so a bad value exits 2 with that parser's
one sentence (``Error: Invalid value for '--dtype': Unknown dtype 'fp8'; ...``), and can
write its value back as a user would type it (`Parsed.show`, for the command line that
config.json records).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from precision_lab.dtypes import parse_dtype, short_name
from precision_lab.errors import UsageError
from precision_lab.gate.checks import parse_factor, parse_fraction, parse_probability, parse_size
from precision_lab.specs import parse_specs


class Parsed(click.ParamType):
    """A click type over a parser ``parse(text, option) -> value``.

    Args:
        name: The type's name in click's messages.
        parse: Raises `UsageError` (or ValueError) with one sentence for a bad value.
        show: Writes a value back as command-line text; ``str`` by default.
    """

    def __init__(
        self,
        name: str,
        parse: Callable[[str, str], Any],
        show: Callable[[Any], str] = str,
    ) -> None:
        self.name = name
        self._parse = parse
        self.show = show

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if not isinstance(value, str):
            return value  # a default already parsed, or a value given in Python
        option = param.opts[0] if param is not None else self.name
        try:
            return self._parse(value, option)
        except ValueError as error:  # UsageError included
            self.fail(str(error), param, ctx)


def _names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{option} needs a comma-separated list of names, got {text!r}.")
    return names


def _seeds(text: str, option: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(
            f"{option} must be a comma-separated list of non-negative integers such as 0,1,2, "
            f"got {text!r}."
        )
    return seeds


DTYPE = Parsed("dtype", lambda text, _: parse_dtype(text), short_name)
"""``fp32|fp16|bf16`` or a torch name -> a torch dtype."""

SPECS = Parsed(
    "specs",
    lambda text, _: parse_specs(text),
    lambda specs: ",".join(spec.text for spec in specs),
)
"""Comma-separated optimizer specs -> a list of `OptimizerSpec`, duplicates removed."""

NAMES = Parsed("names", _names, ",".join)
"""A comma-separated list of names (scenarios)."""

MODELS = Parsed("models", _names, ",".join)
"""A comma-separated list of workloads: built-in names or import paths, ``package.module:NAME``
or ``path/to/file.py:NAME``; what each leads to is checked when the suite is chosen
(`precision_lab.run.resolve`), which needs the suite's batch size and optimizers."""

MODELS_HELP = (
    "Comma-separated workloads: built-ins (mlp, cnn, resnet, transformer, lm), "
    "package.module:NAME or path/to/file.py:NAME, NAME a precision_lab.Workload or a "
    "function returning one (docs/workloads.md)."
)

SEEDS = Parsed("seeds", _seeds, lambda seeds: ",".join(map(str, seeds)))
"""A comma-separated list of non-negative integers."""

FRACTION = Parsed("fraction", parse_fraction)
PROBABILITY = Parsed("probability", parse_probability)
FACTOR = Parsed("factor", parse_factor)
SIZE = Parsed("size", parse_size)

RUN_DIR = click.Path(path_type=Path)
"""A run directory (checked when read, by `precision_lab.run.directory.read_run`)."""
JSON_FILE = click.Path(dir_okay=False, path_type=Path)
"""A JSON file (a baseline) to read or write."""
