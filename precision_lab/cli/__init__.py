"""The ``precision-lab`` command line: parses, builds library objects, calls them.

Exit codes (DESIGN.md): 0 success, 1 a gate found a regression, 2 usage or input error
(one sentence, no traceback), 130 after Ctrl-C and 143 after SIGTERM once what was
recorded is saved. Each command lives in its own module and is added to the group below;
commands receive the shared `precision_lab.cli.context.LabContext` through ``@pass_lab`` and
report bad input by raising `precision_lab.errors.UsageError` inside ``@user_errors``.
"""

from __future__ import annotations

import click

from precision_lab import __version__
from precision_lab.cli.context import LabContext
from precision_lab.cli.gate import baseline_command, gate_command
from precision_lab.cli.memory import memory_command
from precision_lab.cli.report import report_command
from precision_lab.cli.stress import stress
from precision_lab.errors import EXIT_INTERRUPTED, EXIT_REGRESSION, EXIT_TERMINATED, EXIT_USAGE

__all__ = ["EXIT_INTERRUPTED", "EXIT_REGRESSION", "EXIT_TERMINATED", "EXIT_USAGE", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="precision-lab")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """SINGD and KFAC in low precision: stress suites, reports and CI gates."""
    ctx.ensure_object(LabContext)


cli.add_command(stress)
cli.add_command(baseline_command)
cli.add_command(gate_command)
cli.add_command(report_command)
cli.add_command(memory_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="precision-lab")
