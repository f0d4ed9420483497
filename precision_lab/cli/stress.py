"""``precision-lab stress``: run a suite, show progress, write a run directory, print a table.

The command only parses its options, builds a `precision_lab.run.suite.Suite`, runs each
`RunPlan` with `precision_lab.run.runner.train` and hands the outcomes to a
`precision_lab.run.directory.RunDirectory`. Under torchrun every rank runs every training
data-parallel; rank 0 alone shows progress and writes the run directory.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import signal
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from precision_lab import __version__
from precision_lab.cli.context import LabContext, pass_lab
from precision_lab.cli.interrupts import ReportSkipped, StopSignals
from precision_lab.cli.params import DTYPE, MODELS, MODELS_HELP, NAMES, SEEDS, SPECS
from precision_lab.dtypes import dtype_name
from precision_lab.errors import EXIT_REGRESSION, UsageError, fail, user_errors
from precision_lab.report.write import write_report
from precision_lab.run.directory import REPORT_FILE, RunDirectory
from precision_lab.run.frontiers import ENTRY_KEY, frontier_entries, median_cost
from precision_lab.run.runner import Outcome, RankFailedError, train
from precision_lab.run.suite import BUILTIN_SUITES, load_suite
from precision_lab.specs import OptimizerSpec


def _device(choice: str) -> torch.device:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise UsageError(
            "--device cuda was requested but CUDA is not available on this machine; "
            "use --device cpu or auto."
        )
    if choice == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _default_out() -> Path:
    """A new folder reports/runs/<UTC timestamp>[-n], created here: two suites started in
    the same second get two folders, never one shared (mkdir is atomic)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    root = Path("reports") / "runs"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"Cannot create {root} ({err.strerror or err}); pass a writable --out directory."
        ) from None
    n = 0
    while True:
        out = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1
        except OSError as err:
            raise UsageError(
                f"Cannot create {out} ({err.strerror or err}); pass a writable --out directory."
            ) from None


def _init_distributed(device: torch.device) -> dist.Store | None:
    """Join torchrun's process group (its environment says where) if there is one.

    Returns:
        The job's rendezvous store (the process group is built on it), where a rank
        whose run fails leaves word for the others; None when not under torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world
        )
        return store
    return None


def _command_line(ctx: click.Context) -> str:
    """The command as a user would retype it: the options given, whatever launched it
    (console script, ``python -m``, torchrun, a test)."""
    words = ["precision-lab", "stress"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == () or value == param.get_default(ctx):
            continue
        show = getattr(param.type, "show", str)
        for item in value if param.multiple else (value,):
            words += [param.opts[0], show(item)]
    return shlex.join(words)


def _versions() -> dict[str, str]:
    import numpy

    return {
        "precision_lab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or unit == "GiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "[yellow]no[/yellow]")


def _percent(fraction: float | None) -> str:
    """A preconditioned fraction as a percentage, warning colour when none is; "-" for a
    first-order optimizer."""
    if fraction is None:
        return "-"
    shown = f"{fraction:.0%}" if fraction in (0.0, 1.0) else f"{fraction:.1%}"
    return f"[yellow]{shown}[/yellow]" if fraction == 0.0 else shown


def _escalated(run: dict[str, Any]) -> str:
    """A ``+auto`` run's dtype changes and the share of its factors they widened; "-"
    for any other run."""
    if run.get("precision_events") is None:
        return "-"
    return f"{run['precision_events']} ({run['promoted_fraction']:.0%})"


RUNG_MARKS = {"held": ".", "broke": "[red]x[/red]", "no_learning": "[yellow]n[/yellow]"}
"""How `frontier_table` draws each rung's status (anything else, missing: ``?``)."""


def _rungs(statuses: list[str]) -> str:
    return "".join(RUNG_MARKS.get(status, "?") for status in statuses)


def _verdict(entry: dict[str, Any]) -> str:
    text = escape(entry["verdict"])
    cost = entry["precision_cost"]
    return f"[red]{text}[/red]" if cost is not None and cost > 0 else text


def frontier_table(entries: list[dict[str, Any]]) -> Table:
    """One line per frontier entry (optimizer x dtype x seed on each model's knob): the
    breaking point (mildest rung that broke) beside float32's, the cost in rungs and the
    verdict; the rungs drawn mildest first (``.`` held, ``x`` broke, ``n`` did not learn,
    ``?`` missing). With several seeds, a ``median`` line follows each configuration's.
    """
    table = Table(
        title="frontiers: where each optimizer breaks, in the dtype and in float32",
        header_style="bold",
    )
    headers = ["model", "knob", "optimizer", "dtype", "mode", "seed", "ladder (mild -> harsh)"]
    headers += ["rungs", "float32 rungs", "breaks at", "float32 breaks at", "cost", "verdict"]
    for header in headers:
        table.add_column(header, overflow="ellipsis", no_wrap=True)
    medians = median_cost(entries)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(tuple(entry[k] for k in ENTRY_KEY[:-1]), []).append(entry)
    for key, group in groups.items():
        for entry in sorted(group, key=lambda e: e["seed"]):
            ladder = entry["ladder"]
            table.add_row(
                *key[:2],
                entry["optimizer"],
                entry["dtype"],
                entry["mode"],
                str(entry["seed"]),
                f"{format(ladder[0], 'g')} -> {format(ladder[-1], 'g')} ({len(ladder)})",
                _rungs([r["status"] for r in entry["rungs"]]),
                _rungs([r["control_status"] for r in entry["rungs"]]),
                "held" if entry["breaking_point"] is None else format(entry["breaking_point"], "g"),
                "held"
                if entry["control_breaking_point"] is None
                else format(entry["control_breaking_point"], "g"),
                _fmt(entry["precision_cost"]) + ("+" if entry["cost_lower_bound"] else ""),
                _verdict(entry),
            )
        if len(group) > 1:
            median = medians[key]
            table.add_row(
                *key[:2],
                key[2],
                key[3],
                key[4],
                "median",
                "",
                "",
                "",
                "",
                "",
                _fmt(median),
                "",
            )
    return table


def _metric_header(runs: list[dict[str, Any]]) -> str:
    """``accuracy`` for the digits' test accuracy; a workload's own metric by its name, or
    ``metric`` when the runs' workloads name theirs differently (summary.json's
    ``metric_name`` says which is which)."""
    names = {run.get("metric_name") for run in runs} - {None}
    if names <= {"test_accuracy"}:
        return "accuracy"
    return names.pop() if len(names) == 1 else "metric"


def summary_table(runs: list[dict[str, Any]], seeds: bool) -> Table:
    """One line per run with summary.json's headline figures.

    ``ctl`` marks a float32 control; events are counts of steps with NaN / Inf / a skipped
    step / an overflow; memory in binary units (``tensor peak``: live tensors above the
    model's own, ``peak_tensor_bytes``, comparable between optimizers on the CPU too, where
    the process's peak, ``peak_memory_bytes`` in summary.json, is mostly the torch
    runtime's); step time in ms; ``escalated``: a ``+auto``
    run's dtype changes and the share of its factors they widened.
    """
    table = Table(title="precision-lab stress", show_lines=False, header_style="bold")
    headers = [
        "model",
        "scenario",
        "optimizer",
        "dtype",
        "mode",
        "seed",
        "diverged",
        "non-finite at",
        "nan/inf/skip/ovf",
        "max cond",
        "opt state",
        "tensor peak",
        "final loss",
        _metric_header(runs),
        "learned",
        "precond",
        "escalated",
        "step ms",
        "cause",
    ]
    if seeds:
        headers.append("seeds broken")
    for header in headers:
        table.add_column(header, overflow="ellipsis", no_wrap=True)
    for run in runs:
        if not run["finished"] and not run["error"] and run["steps"] == 0:
            status = "[dim]not run[/dim]"
        elif run["error"]:
            status = "[red]crashed[/red]"
        elif run["diverged"]:
            status = "[red]yes[/red]"
        else:
            status = "no" if run["finished"] else "[yellow]unfinished[/yellow]"
        events = "/".join(
            _fmt(run[k]) for k in ("nan_events", "inf_events", "skipped_steps", "overflow_events")
        )
        cause = run["failure_cause"]
        dtype = run["dtype"] + (" ctl" if run["control_of"] else "")
        row = [
            run["model"],
            run["scenario"],
            run["optimizer"],
            dtype,
            run["mode"],
            str(run["seed"]),
            status,
            _fmt(run["first_nonfinite_step"]),
            events,
            _fmt(run["max_condition"]),
            _fmt(run["optimizer_state_bytes"], "bytes"),
            _fmt(run.get("peak_tensor_bytes"), "bytes"),
            _fmt(run["final_loss"]),
            _fmt(run["accuracy"]),
            _yes_no(run.get("learned")),
            _percent(run.get("preconditioned_fraction")),
            _escalated(run),
            _fmt(run["step_time_ms"]),
            f"[red]{cause}[/red]" if cause == "precision" else _fmt(cause),
        ]
        if seeds:
            row.append(f"{run['seeds_broken']}/{run['seeds_total']}")
        table.add_row(*row)
    return table


@click.command("stress")
@click.option(
    "--dtype",
    "dtypes",
    type=DTYPE,
    multiple=True,
    metavar="fp32|fp16|bf16",
    help="Dtype to stress (repeatable; torch names accepted). Default: the suite's.",
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    metavar="pure|mixed",
    help="pure: model and optimizer state in the dtype; mixed: float32 master weights, "
    "autocast, GradScaler for float16 (repeatable). Default: the suite's.",
)
@click.option(
    "--suite",
    "suite_name",
    default="default",
    show_default=True,
    metavar="|".join(BUILTIN_SUITES) + "|FILE.toml",
    help="A built-in suite or a TOML file (schema: docs/suites.md).",
)
@click.option(
    "--optimizers",
    type=SPECS,
    help="Comma-separated optimizer specs, e.g. singd:diagonal,kfac:eigh.",
)
@click.option("--models", type=MODELS, help=MODELS_HELP)
@click.option(
    "--scenarios",
    type=NAMES,
    help="Comma-separated: knobs selecting the suite's frontiers (damping, input_scale, "
    "loss_scale, lr_cov) and/or scenarios (baseline, a rung such as damping=1e-08); "
    "see docs/suites.md.",
)
@click.option("--steps", type=click.IntRange(min=1), help="Training steps per run.")
@click.option("--seeds", type=SEEDS, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--every", type=click.IntRange(min=1), help="Cadence of the expensive probes, steps.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when available, else CPU.",
)
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun, shard each model with FSDP2 (fully_shard) instead of DDP.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Run directory to write. Default: reports/runs/<UTC timestamp> in the current directory.",
)
@pass_lab
@user_errors
def stress(lab: LabContext, **options: Any) -> None:
    """Run a stress suite: each run in a low-precision dtype beside its float32 control.

    Writes a run directory (config.json, summary.json, records.parquet, report.html,
    failures/) and prints a summary table and the directory's path. A run that diverges
    is stopped and recorded; the suite goes on. Ctrl-C or SIGTERM stops the run in
    progress and saves what was recorded; a second one skips the report. Exit codes:
    0 done, 2 bad input (a non-empty or locked --out, a full disk), 130 after Ctrl-C and
    143 after SIGTERM (what ran is saved).
    """
    stop = StopSignals(install=int(os.environ.get("WORLD_SIZE", "1")) <= 1)
    try:
        _stress(lab, stop, **options)
    except KeyboardInterrupt:  # before the run directory existed: nothing to save
        fail("Interrupted before any run was recorded.", stop.exit_code)
    finally:
        stop.restore()


def _stress(
    lab: LabContext,
    stop: StopSignals,
    *,
    dtypes: tuple[torch.dtype, ...],
    modes: tuple[str, ...],
    suite_name: str,
    optimizers: list[OptimizerSpec] | None,
    models: list[str] | None,
    scenarios: list[str] | None,
    steps: int | None,
    seeds: list[int] | None,
    every: int | None,
    device: str,
    fsdp: bool,
    out: Path | None,
) -> None:
    """The stress command's work once its signal handlers are in place."""
    suite = load_suite(suite_name).choose(
        models=models,
        scenarios=scenarios,
        optimizers=None if optimizers is None else [spec.text for spec in optimizers],
        dtypes=list(dtypes),
        modes=list(modes),
        seeds=seeds,
        steps=steps,
        every=every,
    )
    torch_device = _device(device)
    plans = suite.plan()
    store = _init_distributed(torch_device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = {
        "suite": {"name": suite.name, "source": suite.source, "text": suite.text},
        "optimizers": sorted({p.optimizer for p in plans}),
        "models": sorted({p.model for p in plans}),
        "scenarios": sorted({p.scenario for p in plans}),
        "frontiers": [
            {"models": list(f.models), "knob": f.knob, "ladder": list(f.ladder)}
            | {"optimizers": list(f.optimizers)}
            for f in suite.frontiers
        ],
        "dtypes": [dtype_name(d) for d in suite.dtypes],
        "modes": list(suite.modes),
        "seeds": list(suite.seeds),
        "steps": suite.steps,
        "batch_size": suite.batch_size,
        "every": suite.every,
        "versions": _versions(),
        "device": str(torch_device),
        "world_size": world,
        "command": _command_line(click.get_current_context()),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    run_dir = (
        RunDirectory(out or _default_out(), config, plans, suite.skipped()) if rank == 0 else None
    )
    if run_dir is not None and world > 1:
        # Once a rank fails, torchrun stops the others with SIGTERM (and SIGKILL after its
        # grace period): rank 0 lets its collective fail instead, so that it can record
        # the run and close the run directory (its records merged, the report).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    failure: RankFailedError | None = None
    try:
        interrupted = _run_all(
            plans,
            suite.every,
            torch_device,
            run_dir,
            lab.progress_console,
            store,
            stop,
            "fsdp" if fsdp else "ddp",
        )
        if dist.is_initialized() and not interrupted:
            # Leave together: a rank that destroys its process group while rank 0 still
            # receives the last gather aborts in gloo.
            dist.barrier()
    except KeyboardInterrupt:  # between two runs: every finished run is already recorded
        interrupted = True
    except RankFailedError as err:
        failure, interrupted = err, True
    finally:
        if dist.is_initialized() and failure is None:
            dist.destroy_process_group()
    if run_dir is None:
        if failure is not None:
            fail(str(failure), EXIT_REGRESSION)
        return
    report_skipped = _close(run_dir, stop)
    if failure is not None:
        click.echo(f"Run directory: {run_dir.path}", err=True)
        fail(str(failure), EXIT_REGRESSION)
    if not lab.console.is_terminal:
        # Piped output would get rich's 80 columns: too few for this table to stay readable.
        lab.console.width = max(lab.console.width, 240)
    runs = run_dir.summary()
    entries = frontier_entries(runs)
    if entries:
        lab.console.print(frontier_table(entries))
    lab.console.print(summary_table(runs, seeds=len(suite.seeds) > 1))
    for skip in run_dir.skipped:
        lab.console.print(
            f"Skipped {skip['model']} x {skip['scenario']}: {skip['reason']}.", soft_wrap=True
        )
    lab.console.print(f"Run directory: {run_dir.path}", soft_wrap=True)
    if report_skipped:
        lab.progress_console.print(
            "Report skipped: rebuild it with: precision-lab report "
            + shlex.quote(str(run_dir.path)),
            soft_wrap=True,
        )
    if interrupted or stop.received:
        lab.progress_console.print("Interrupted: the runs recorded so far are saved.")
        raise click.exceptions.Exit(stop.exit_code)


def _close(run_dir: RunDirectory, stop: StopSignals) -> bool:
    """Close the run directory (records merged, lock released), then write its report from
    what it holds, unless a signal asks to leave sooner.

    Returns:
        True when the report was skipped (a second signal, or one while closing).
    """
    stop.closing = True
    run_dir.close()
    if stop.skip_report:
        return True
    try:
        with stop.writing_report():
            write_report([run_dir.path], run_dir.path / REPORT_FILE)
    except ReportSkipped:
        return True
    return False


def _run_all(
    plans: list,
    every: int,
    device: torch.device,
    run_dir: RunDirectory | None,
    console: Console,
    store: dist.Store | None,
    stop: StopSignals,
    sharding: str = "ddp",
) -> bool:
    """Train every plan in order, recording each outcome; True if Ctrl-C stopped the suite.

    A signal that arrives while an outcome is being recorded is held until it is (``stop``).
    """
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=run_dir is None, transient=False) as bar:
        task = bar.add_task("starting", total=len(plans))
        for plan in plans:
            bar.update(task, description=plan.run_id)
            failure: RankFailedError | None = None
            try:
                outcome = train(
                    plan,
                    device=device,
                    every=every,
                    failure_dir=None if run_dir is None else run_dir.failures,
                    store=store,
                    sharding=sharding,
                )
            except KeyboardInterrupt:
                return True
            except RankFailedError as err:  # fatal under torchrun: recorded, then it stops
                outcome, failure = err.outcome, err
            except Exception as err:  # a run that cannot even start is recorded, not fatal ...
                outcome = Outcome({"run": plan.run_id, "error": f"{type(err).__name__}: {err}"})
                if dist.is_initialized() and dist.get_world_size() > 1:  # ... but for torchrun
                    failure = RankFailedError(
                        plan.run_id, outcome.summary["error"], outcome, started=False, store=store
                    )
            if run_dir is not None:
                with stop.protected():
                    run_dir.add(outcome.summary, outcome.records)
                if outcome.summary.get("error"):
                    # Error texts may hold brackets (gloo's "[.../pair.cc:553]"): not markup.
                    error = escape(outcome.summary["error"])
                    console.print(f"[red]{escape(plan.run_id)} crashed[/red]: {error}")
            if failure is not None:
                raise failure
            if outcome.interrupted:
                return True
            bar.advance(task)
    return False
