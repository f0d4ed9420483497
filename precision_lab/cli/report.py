"""``precision-lab report``: the offline HTML report of one or several run directories.

The command parses, calls `precision_lab.report.write.write_report` and prints. Exit
codes: 0 success, 2 usage or input error (one sentence on stderr, no traceback).
"""

from __future__ import annotations

from pathlib import Path

import click

from precision_lab.cli.context import LabContext, pass_lab
from precision_lab.cli.params import RUN_DIR
from precision_lab.errors import UsageError, user_errors
from precision_lab.report.scaling import mb
from precision_lab.report.write import write_report


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=RUN_DIR)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write [default: RUN_DIR/report.html for one run directory].",
)
@click.option("--title", help="Page title [default: the run directories' names].")
@pass_lab
@user_errors
def report_command(
    lab: LabContext, run_dirs: tuple[Path, ...], output: Path | None, title: str | None
) -> None:
    """Write the offline HTML report of RUN_DIR, or compare several side by side."""
    if output is None:
        if len(run_dirs) > 1:
            raise UsageError(
                f"Comparing {len(run_dirs)} run directories needs an output file: add -o FILE.html."
            )
        output = run_dirs[0] / "report.html"
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(
            f"Output {str(output)!r} should end in .html, the report is one HTML file."
        )
    path = write_report(run_dirs, output, title=title)
    size = path.stat().st_size
    lab.console.print(f"Report written: {path} ({mb(size)})")
