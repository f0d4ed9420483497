"""Errors a user can cause, the exit codes of DESIGN.md, and how commands report them.

A command raises `UsageError` with one sentence naming the bad value and what would be
right; `user_errors` turns it into that sentence on stderr and exit code 2, without a
traceback, and a Ctrl-C into exit code 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import click

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
"""After SIGTERM (128 + 15), once what was recorded is saved (`precision_lab.cli.interrupts`)."""

P = ParamSpec("P")
R = TypeVar("R")


class UsageError(ValueError):
    """Bad input from the user: a wrong name, a missing file, a corrupt baseline."""


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``Error: <message>`` on stderr and leave the command with ``code``."""
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(code)


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a click command: a `UsageError` exits 2 with its sentence, and a Ctrl-C the
    command did not handle itself exits 130 (click alone would print "Aborted!", exit 1)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UsageError as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail("Interrupted.", EXIT_INTERRUPTED)

    return wrapper
