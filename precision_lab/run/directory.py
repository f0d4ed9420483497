"""The run directory a stress suite writes, and `load_run`, which reads it back.

::

    RUN_DIR/
      config.json      the suite (its TOML text), optimizers, dtypes, modes, seeds,
                       versions, device and command line
      summary.json     {"schema": 1, "runs": [one object per run], "records": [files]},
                       rewritten after every run
      records/         while the suite runs: one Parquet file per recorded run
      records.parquet  once the suite has closed: those files as one long table (every
                       probe row plus ``train`` rows)
      report.html      the report
      failures/        KFAC's reproducers of failed decompositions, in failures/<run id>/
      .lock            locked (``flock``) by the one process writing the directory

Every planned run is in summary.json from the start, ``finished: false`` until it has
run, so a suite stopped by Ctrl-C or a crash says what it did not do. Every field's
definition is in `FIELDS` (DESIGN.md's where it names the field), and summary.json
repeats them under ``fields``.

A kill at any instant (SIGKILL included) leaves every recorded run readable: each file
is written under a temporary name unique to the process and renamed into place, a run's
records are complete in their own file before summary.json lists that file under
``records``, and readers read only the files listed (a directory written before
``records`` existed has records.parquet alone). One process writes a directory: it
holds the lock from the start, and only an empty directory (or a new one) is accepted.

Non-finite numbers are written as null, so the JSON stays valid. `read_summary` checks
every run's figures (type and range) when a directory is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from precision_lab.dtypes import dtype_name
from precision_lab.errors import UsageError
from precision_lab.report.write import write_report
from precision_lab.run.suite import RunPlan
from probes.records import ARROW_SCHEMA, frame_from_rows, read_parquet, write_parquet

SUMMARY_SCHEMA = 1
RECORDS_FILE = "records.parquet"
RECORDS_DIR = "records"
LOCK_FILE = ".lock"

FIELDS: dict[str, str] = {
    "run": "the run's id: model/scenario/optimizer/dtype/mode/s<seed>[/control-<dtype>-<mode>]",
    "model": "mlp, cnn or transformer",
    "scenario": "the scenario's name (docs/suites.md)",
    "optimizer": "the optimizer's canonical spec string",
    "structure": "SINGD's structure, K or K/C; dense for KFAC; null for AdamW and SGD",
    "dtype": "the run's dtype, torch name",
    "mode": "pure: model and optimizer state in the dtype; mixed: float32 master weights, "
    "autocast, GradScaler for float16",
    "seed": "seed of the weights and of the batch order",
    "control_of": "for a float32 control, the id of the run it controls; else null",
    "steps": "optimizer steps taken (fewer than planned when the run diverged or stopped)",
    "finished": "the run ran to its end or to its divergence",
    "diverged": "the loss became non-finite or exceeded 10x its first value (the run stops)",
    "first_nonfinite_step": "first step with a NaN/Inf loss or watched tensor; null if none",
    "nan_events": "steps with any NaN in a watched tensor, skipped steps excluded",
    "inf_events": "steps with any Inf in a watched tensor, skipped steps excluded",
    "skipped_steps": "steps skipped on infinite gradients (GradScaler or the optimizer)",
    "overflow_events": "steps with a finite watched value above half the dtype's maximum (or "
    "one that would overflow when cast to the run's dtype), skipped steps excluded",
    "underflow_fraction": "largest fraction, over watched tensors, of nonzero values that are "
    "subnormal or flush to zero in the dtype",
    "max_condition": "largest condition number of any preconditioner factor seen; null "
    "without factors",
    "optimizer_state_bytes": "bytes of optimizer state at the end, fallback optimizer included (B)",
    "peak_memory_bytes": "CUDA allocator peak, or the process's resident-memory high-water "
    "mark, reset per run (B)",
    "final_loss": "training loss of the last step taken (nats)",
    "accuracy": "test accuracy on the digits at the end, in [0, 1]; null for synthetic data",
    "step_time_ms": "median wall-clock time of a training step, probes included (ms)",
    "failure_cause": "none, precision (the run broke, its float32 control held) or "
    "optimization (the control broke too, or a float32 run broke); a run broke when it "
    "diverged or crashed; null while it or its control is unfinished",
    "fallback_optimizer": "optimizer of the parameters no Kronecker factor covers; null for "
    "AdamW and SGD",
    "control": "the float32 control's figures beside this run's; null for a float32 run",
    "seeds_broken": "over the seeds of this configuration, how many broke",
    "seeds_total": "how many seeds of this configuration the suite plans",
    "error": "for a run that crashed, '<exception type>: <message>'; else null",
    "warnings": "distinct warnings raised while the run was built and trained",
    "hyperparameters": "the optimizer's hyperparameters as built (family defaults, then the "
    "suite's and the scenario's overrides)",
}
"""Every run object's keys in the order written, with their definitions (DESIGN.md's for
the fields it names); summary.json carries them under ``fields``."""

SUMMARY_FIELDS = tuple(FIELDS)

CONTROL_FIELDS = (
    "run",
    "finished",
    "diverged",
    "first_nonfinite_step",
    "nan_events",
    "inf_events",
    "max_condition",
    "final_loss",
    "accuracy",
    "error",
)
"""The control's figures copied beside each low-precision run."""


def broke(run: dict[str, Any]) -> bool | None:
    """Whether a run diverged or crashed; None while it is unfinished and did neither."""
    if run.get("diverged") or run.get("error"):
        return True
    return False if run.get("finished") else None


def failure_cause(run: dict[str, Any], control: dict[str, Any] | None) -> str | None:
    """``none``, ``precision`` or ``optimization`` (module docstring); None when unknown."""
    run_broke = broke(run)
    if run_broke is None or not run_broke:
        return None if run_broke is None else "none"
    if control is None:
        return "optimization"
    control_broke = broke(control)
    if control_broke is None:
        return None
    return "optimization" if control_broke else "precision"


def _jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats to None, dtypes and other objects to strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` and a rename: a reader (or a kill) sees the old
    file or the whole new one. The temporary name is unique to this process.

    Raises:
        UsageError: The file cannot be written (read-only, disk full, file too large).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UsageError(
                f"Cannot write {path} ({err.strerror or err}); the runs recorded before it "
                f"stay readable in {path.parent}."
            ) from None
        raise


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _lock(path: Path) -> int:
    """Create ``path`` if needed, lock it for this process and check that it is empty.

    Returns:
        The lock file's descriptor; the lock lasts until it is closed (or the process
        ends, however it ends).

    Raises:
        UsageError: The directory cannot be created, another process holds its lock, or
            it holds anything but the lock file.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UsageError(
            f"Cannot create the run directory {path} ({err.strerror or err}); pass a "
            "writable --out directory."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        why = (
            "another precision-lab process is writing it"
            if isinstance(err, BlockingIOError)
            else f"it cannot be locked ({err.strerror or err})"
        )
        raise UsageError(f"{path} cannot be used as a run directory: {why}.") from None
    found = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if found:
        os.close(fd)
        if "summary.json" in found:
            raise UsageError(
                f"{path} already holds a run (summary.json): pass a new --out directory."
            )
        raise UsageError(
            f"{path} is not empty (it holds {found[0]!r}"
            f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}): pass a new or "
            "empty --out directory."
        )
    return fd


def planned_run(plan: RunPlan) -> dict[str, Any]:
    """The run object of a run that has not run yet: its coordinates, figures null."""
    run = dict.fromkeys(SUMMARY_FIELDS)
    run.update(
        run=plan.run_id,
        model=plan.model,
        scenario=plan.scenario,
        optimizer=plan.optimizer,
        dtype=dtype_name(plan.dtype),
        mode=plan.mode,
        seed=plan.seed,
        control_of=plan.control_of,
        steps=0,
        finished=False,
        diverged=False,
        hyperparameters=plan.hyperparameters,
    )
    return run


class RunDirectory:
    """Writes one run directory as the suite goes; see the module docstring.

    Args:
        path: The directory: new, or empty. It is locked for this process until `close`.
        config: The content of config.json.
        plans: Every run of the suite, in order.

    Raises:
        UsageError: The directory cannot be created, is not empty, or is being written
            by another process; or a file cannot be written (then and in every method).
    """

    def __init__(self, path: Path, config: dict[str, Any], plans: list[RunPlan]) -> None:
        self.path = Path(path)
        self._lock = _lock(self.path)
        self.failures = self.path / "failures"
        self.plans = plans
        self.runs: dict[str, dict[str, Any]] = {p.run_id: planned_run(p) for p in plans}
        self.records: list[str] = []
        """The records files summary.json lists, relative to the directory."""
        try:
            for folder in (self.failures, self.path / RECORDS_DIR):
                folder.mkdir()
        except OSError as err:
            raise UsageError(f"Cannot write in {self.path} ({err.strerror or err}).") from None
        _write_json(self.path / "config.json", config)
        self.write_summary()

    def add(self, summary: dict[str, Any], records: pd.DataFrame) -> None:
        """Record one run's outcome: its records in a file of their own, then summary.json."""
        if len(records):
            name = f"{RECORDS_DIR}/{len(self.records) + 1:05d}.parquet"
            _atomic(self.path / name, partial(write_parquet, records))
            self.records.append(name)
        self.runs[summary["run"]].update(summary)
        self.write_summary()

    def summary(self) -> list[dict[str, Any]]:
        """Run objects with the derived fields (control, failure_cause, seeds) filled in."""
        by_config: dict[str, list[dict[str, Any]]] = {}
        for plan in self.plans:
            by_config.setdefault(plan.config_key, []).append(self.runs[plan.run_id])
        controls = {
            run["control_of"]: run for run in self.runs.values() if run["control_of"] is not None
        }
        out = []
        for plan in self.plans:
            run = dict(self.runs[plan.run_id])
            control = controls.get(run["run"])
            run["control"] = (
                None if control is None else {k: control.get(k) for k in CONTROL_FIELDS}
            )
            run["failure_cause"] = failure_cause(run, control)
            seeds = by_config[plan.config_key]
            run["seeds_total"] = len(seeds)
            run["seeds_broken"] = sum(bool(broke(r)) for r in seeds)
            out.append({k: run.get(k) for k in SUMMARY_FIELDS})
        return out

    def write_summary(self) -> None:
        summary = {
            "schema": SUMMARY_SCHEMA,
            "fields": FIELDS,
            "records": self.records,
            "runs": self.summary(),
        }
        _write_json(self.path / "summary.json", summary)

    def merge_records(self) -> None:
        """Join the runs' records files into records.parquet, then point summary.json at it.

        Until the new summary.json is in place it lists the runs' files, which stay
        until then: a kill in between loses nothing.
        """
        parts = [self.path / name for name in self.records]

        def write(tmp: Path) -> None:
            with pq.ParquetWriter(str(tmp), ARROW_SCHEMA) as writer:
                for part in parts:  # one run's records in memory at a time
                    writer.write_table(pq.read_table(str(part)))

        _atomic(self.path / RECORDS_FILE, write)
        self.records = [RECORDS_FILE]
        self.write_summary()
        shutil.rmtree(self.path / RECORDS_DIR, ignore_errors=True)

    def write_report(self) -> None:
        """Write report.html from what the directory holds."""
        write_report([self.path], self.path / "report.html")

    def close(self) -> None:
        """Merge the records, write report.html and release the directory's lock."""
        self.merge_records()
        self.write_report()
        self.release()

    def release(self) -> None:
        """Let another process use the directory (the lock also ends with the process)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


_COUNT = (int, "a non-negative integer", lambda v: v >= 0)
_SCORE = (float, "a number", math.isfinite)
_FRACTION = (float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
_SIZE = (float, "a non-negative number", lambda v: v >= 0 and math.isfinite(v))
_TEXT = (str, "a string", None)
FIGURE_TYPES: dict[str, tuple[type, str, Callable[[Any], bool] | None]] = {
    **dict.fromkeys(("model", "scenario", "optimizer", "structure", "dtype", "mode"), _TEXT),
    **dict.fromkeys(("control_of", "error", "fallback_optimizer"), _TEXT),
    **dict.fromkeys(("finished", "diverged"), (bool, "true or false", None)),
    **dict.fromkeys(
        (
            "seed",
            "steps",
            "first_nonfinite_step",
            "nan_events",
            "inf_events",
            "skipped_steps",
            "overflow_events",
            "seeds_broken",
            "seeds_total",
        ),
        _COUNT,
    ),
    "underflow_fraction": _FRACTION,
    "accuracy": _FRACTION,
    **dict.fromkeys(("optimizer_state_bytes", "peak_memory_bytes", "max_condition"), _SIZE),
    "step_time_ms": _SIZE,
    "final_loss": _SCORE,
    "failure_cause": (
        str,
        "one of none, precision, no_learning, optimization",
        lambda v: v in ("none", "precision", "no_learning", "optimization"),
    ),
    "control": (dict, "an object", None),
    "hyperparameters": (dict, "an object", None),
    "warnings": (list, "a list", None),
}
"""Each summary field's JSON type, its description and its range check; every field may
be null (a planned run has no figures yet) except ``run``, a non-empty string."""

_PART = re.compile(rf"{RECORDS_DIR}/\d{{5}}\.parquet")


def _fits(value: Any, kind: type, check: Callable[[Any], bool] | None) -> bool:
    if isinstance(value, bool) and kind is not bool:
        return False
    ok = isinstance(value, int | float if kind is float else kind)
    return ok and (check is None or check(value))


def _check_runs(path: Path, runs: list[Any]) -> None:
    """Every run an object with a ``run`` id and figures of `FIGURE_TYPES`' types."""
    for i, run in enumerate(runs, 1):
        if not isinstance(run, dict):
            raise UsageError(
                f"{path}: run {i} is a {type(run).__name__}, but every run must be an object."
            )
        name = run.get("run")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{path}: run {i} has run = {name!r}, but its id must be a string.")
        for field, (kind, what, check) in FIGURE_TYPES.items():
            value = run.get(field)
            if value is not None and not _fits(value, kind, check):
                raise UsageError(
                    f"{path}: run {name!r} has {field} = {value!r}, but {field} must be "
                    f"{what} or null."
                )


def read_summary(root: Path) -> dict[str, Any]:
    """A run directory's summary.json, checked: ``{"schema", "fields", "runs": [...]}``.

    Every run must be an object whose figures have the types and ranges of
    `FIGURE_TYPES`; ``records``, where present, lists files of this directory only.

    Raises:
        UsageError: (a ValueError) the directory or its summary.json is missing, not
            JSON, or not a summary of `SUMMARY_SCHEMA`, or a figure is of the wrong type
            or out of range, in one sentence naming the file and the field.
    """
    if not root.is_dir():
        raise UsageError(
            f"Run directory {root} does not exist; pass a directory that precision-lab "
            "stress wrote."
        )
    try:
        data = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{root} has no summary.json; it is not a precision-lab run directory."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{root / 'summary.json'} is not valid JSON ({err}).") from None
    except (IsADirectoryError, PermissionError) as err:
        raise UsageError(
            f"{root / 'summary.json'} cannot be read ({type(err).__name__})."
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("schema") != SUMMARY_SCHEMA
        or not isinstance(data.get("runs"), list)
    ):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UsageError(
            f"{root / 'summary.json'} is not a precision-lab summary of schema "
            f"{SUMMARY_SCHEMA} (schema {found!r})."
        )
    path = root / "summary.json"
    _check_runs(path, data["runs"])
    records = data.get("records", [RECORDS_FILE])
    if not isinstance(records, list) or not all(
        isinstance(n, str) and (n == RECORDS_FILE or _PART.fullmatch(n)) for n in records
    ):
        raise UsageError(
            f"{path} has records = {records!r}, but records must list {RECORDS_FILE} or "
            f"{RECORDS_DIR}/NNNNN.parquet files of the run directory."
        )
    return data


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run directory's summary and records as DataFrames, for notebooks.

    Reads a directory whose suite was killed as well as a finished one: the records
    are those of the files summary.json lists.

    Returns:
        ``(summary, records)``: one row per run (the ``control`` figures flattened into
        ``control.<field>`` columns), and the long table of the records.

    Raises:
        ValueError: The directory, its summary.json or records.parquet is missing or
            corrupt, in one sentence.
    """
    root = Path(path)
    data = read_summary(root)
    frames = []
    for name in data.get("records", [RECORDS_FILE]):
        if not (root / name).is_file():
            raise ValueError(f"{root} has no {name}; the run directory is incomplete.")
        frames.append(read_parquet(root / name))
    records = pd.concat(frames, ignore_index=True) if frames else frame_from_rows([])
    summary = (
        pd.json_normalize(data["runs"], max_level=1)
        if data["runs"]
        else pd.DataFrame(columns=SUMMARY_FIELDS)
    )
    return summary, records
