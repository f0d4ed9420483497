"""``precision-lab baseline`` and ``precision-lab gate``: CI gates on memory, stability and
frontiers' breaking points.

The commands parse, build library objects (``precision_lab.gate.baseline``,
``precision_lab.gate.checks``) and call them. Exit codes: 0 pass, 1 regression, 2 usage or input
error (one sentence on stderr, no traceback). ``gate --bisect`` follows ``git bisect run``
instead: 0 good, 1 bad, 125 for a run that cannot be judged (any input or usage error,
which would otherwise read as "bad"); 130 after Ctrl-C aborts the bisection.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from precision_lab.cli.context import LabContext, pass_lab
from precision_lab.cli.params import FACTOR, FRACTION, JSON_FILE, PROBABILITY, RUN_DIR, SIZE
from precision_lab.errors import EXIT_REGRESSION, UsageError, fail, user_errors
from precision_lab.gate.baseline import read_baseline, read_run_dir, write_baseline
from precision_lab.gate.checks import (
    BETTER,
    FAIL,
    NEW,
    SKIP,
    GateResult,
    Tolerances,
    format_value,
    gate,
)

EXIT_CANNOT_JUDGE = 125
"""``git bisect run``'s "skip": this commit's run cannot be judged."""

_STYLE = {FAIL: "bold red", BETTER: "green", NEW: "yellow", SKIP: "dim"}


@click.command("baseline")
@click.argument("run_dir", type=RUN_DIR)
@click.option(
    "-o",
    "--output",
    required=True,
    type=JSON_FILE,
    help="The baseline file to write (JSON).",
)
@pass_lab
@user_errors
def baseline_command(lab: LabContext, run_dir: Path, output: Path) -> None:
    """Freeze RUN_DIR's summary figures (every run, float32 controls included) as a baseline."""
    document = write_baseline(run_dir, output)
    runs = len(document["runs"])
    lab.console.print(
        f"Wrote baseline of suite {document['suite']!r} ({runs} runs) to {output}.",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _table(result: GateResult) -> Table:
    table = Table(title="precision-lab gate", show_lines=False)
    # What identifies a row stays on one line; the note folds.
    for column in ("status", "check", "run", "baseline", "current", "change"):
        table.add_column(column, no_wrap=True)
    table.add_column("note", overflow="fold")
    for verdict in result.verdicts:
        figure = verdict.check.split(".", 1)[-1]
        show = verdict.status not in ("new",) and not verdict.check.startswith("coverage.")
        cells = (
            verdict.status,
            verdict.check,
            verdict.run,
            format_value(figure, verdict.baseline) if show else "",
            format_value(figure, verdict.current) if show else "",
            verdict.change,
            verdict.message.removeprefix(f"{verdict.run}: "),
        )
        # Text, not markup: run names and paths may hold square brackets.
        table.add_row(*map(Text, cells), style=_STYLE.get(verdict.status))
    return table


def _report(result: GateResult, console: Console) -> None:
    if not console.is_terminal:
        # CI logs are no terminal: rich would squeeze the table into 80 columns there.
        console = Console(file=console.file, width=max(console.width, 240), no_color=True)
    console.print(_table(result))
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if result.timing is not None:
        timing = result.timing
        console.print(
            f"step time against {timing['against']}: geometric mean x"
            f"{timing['geometric_mean_ratio']:.3g} over {timing['runs']} runs "
            f"(x{timing['min_ratio']:.3g} to x{timing['max_ratio']:.3g})",
            markup=False,
            highlight=False,
        )
    counts = ", ".join(f"{n} {status}" for status, n in result.counts().items() if n)
    if result.passed:
        console.print(f"[green]gate passed[/green]: {counts}")
        return
    console.print(f"[bold red]gate failed[/bold red]: {counts}")
    for message in (verdict.message for verdict in result.failures):
        console.print(f"  {message}", markup=False, highlight=False, soft_wrap=True)


class _GateCommand(click.Command):
    """``gate``, whose own usage errors (a bad option) exit 125 under ``--bisect`` too."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        bisect = "--bisect" in args  # before parsing, which consumes ``args``
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as error:
            if bisect:
                error.exit_code = EXIT_CANNOT_JUDGE
            raise


@click.command("gate", cls=_GateCommand)
@click.argument("run_dir", type=RUN_DIR)
@click.option(
    "--baseline",
    "baseline_path",
    required=True,
    type=JSON_FILE,
    help="Baseline file from 'precision-lab baseline'.",
)
@click.option(
    "--memory-tolerance",
    type=FRACTION,
    default="0%",
    show_default=True,
    help="Allowed growth of optimizer-state bytes (deterministic).",
)
@click.option(
    "--peak-tolerance",
    type=FRACTION,
    default="10%",
    show_default=True,
    help="Allowed relative growth of peak memory, on top of --peak-floor.",
)
@click.option(
    "--peak-floor",
    type=SIZE,
    default=None,
    help="Allowed absolute growth of peak memory, e.g. 64MiB.  [default: 64MiB for a CPU "
    "baseline, whose resident memory is noisy; 2MiB for CUDA]",
)
@click.option(
    "--tensor-tolerance",
    type=FRACTION,
    default="5%",
    show_default=True,
    help="Allowed relative growth of the peak of live tensor bytes (peak_tensor_bytes), on "
    "top of 16 KiB.",
)
@click.option(
    "--condition-factor",
    type=FACTOR,
    default="10",
    show_default=True,
    help="Allowed growth factor of the largest condition number.",
)
@click.option(
    "--nonfinite-tolerance",
    type=FRACTION,
    default="20%",
    show_default=True,
    help="How much earlier the first non-finite step may come.",
)
@click.option(
    "--underflow-tolerance",
    type=FRACTION,
    default="0.01",
    show_default=True,
    help="Allowed absolute growth of the underflow fraction.",
)
@click.option(
    "--loss-tolerance",
    type=FRACTION,
    default="5%",
    show_default=True,
    help="Allowed relative rise of the final loss and fall of the accuracy.",
)
@click.option(
    "--alpha",
    type=PROBABILITY,
    default="0.01",
    show_default=True,
    help="With several seeds per configuration: the significance level at which breaking "
    "in more seeds than the baseline (one-sided Fisher exact test), or breaking points "
    "milder than the baseline's (one-sided permutation test), fail.",
)
@click.option(
    "--against",
    type=RUN_DIR,
    default=None,
    help="Run directory of the same job whose step times RUN_DIR's are compared with.",
)
@click.option(
    "--max-slowdown",
    type=FACTOR,
    default=None,
    help="With --against: fail when the geometric-mean step-time ratio exceeds this factor.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@click.option(
    "--bisect",
    is_flag=True,
    help="Exit codes for 'git bisect run': 0 good, 1 bad, 125 cannot judge (bad input).",
)
@pass_lab
@user_errors
def gate_command(
    lab: LabContext,
    run_dir: Path,
    baseline_path: Path,
    memory_tolerance: float,
    peak_tolerance: float,
    peak_floor: float | None,
    tensor_tolerance: float,
    condition_factor: float,
    nonfinite_tolerance: float,
    underflow_tolerance: float,
    loss_tolerance: float,
    alpha: float,
    against: Path | None,
    max_slowdown: float | None,
    as_json: bool,
    bisect: bool,
) -> None:
    """Gate RUN_DIR against a baseline: exit 0 pass, 1 regression, 2 input error.

    Runs are matched by (model, scenario, optimizer, dtype, mode, seed); memory, stability,
    learning and coverage are checked, and each frontier's breaking points (a breaking
    point that moved milder on its ladder fails); improvements are reported, never
    failures. With several seeds per configuration, breaking and breaking points are
    judged across them (--alpha). With --bisect, exit 125 instead of 2, for 'git bisect run'.
    """
    tolerances = Tolerances(
        memory=memory_tolerance,
        peak=peak_tolerance,
        peak_floor=peak_floor,
        tensor_peak=tensor_tolerance,
        condition_factor=condition_factor,
        nonfinite=nonfinite_tolerance,
        underflow=underflow_tolerance,
        loss=loss_tolerance,
        alpha=alpha,
        max_slowdown=max_slowdown,
    )
    try:
        _gate(lab, run_dir, baseline_path, tolerances, against, as_json)
    except UsageError as error:
        if not bisect:
            raise
        fail(str(error), EXIT_CANNOT_JUDGE)


def _gate(
    lab: LabContext,
    run_dir: Path,
    baseline_path: Path,
    tolerances: Tolerances,
    against: Path | None,
    as_json: bool,
) -> None:
    """Read, gate, report; exit 1 on a regression (a `UsageError` on bad input)."""
    if tolerances.max_slowdown is not None and against is None:
        raise UsageError("--max-slowdown needs --against RUN_DIR to compare with.")
    baseline = read_baseline(baseline_path)
    current = read_run_dir(run_dir)
    reference = read_run_dir(against) if against is not None else None
    result = gate(current, baseline, tolerances, against=reference)
    if as_json:
        document = {"run_dir": str(run_dir), "baseline": str(baseline_path), **result.as_dict()}
        click.echo(json.dumps(document, indent=1, allow_nan=False))
    else:
        _report(result, lab.console)
    if not result.passed:
        raise click.exceptions.Exit(EXIT_REGRESSION)
