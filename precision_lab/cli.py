"""The ``precision-lab`` command line: parses, builds library objects, calls them.

Exit codes (DESIGN.md): 0 success, 1 a gate found a regression, 2 usage or input error
(one sentence, no traceback), 130 after Ctrl-C once what was recorded is saved.
"""

from __future__ import annotations

import click

from precision_lab import __version__

EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="precision-lab")
def cli() -> None:
    """SINGD and KFAC in low precision: stress suites, reports and CI gates."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="precision-lab")
