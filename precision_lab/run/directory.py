"""The run directory: `RunDirectory` writes it as a suite goes, `read_run` reads it back.

::

    RUN_DIR/
      config.json      the suite (its TOML text), optimizers, dtypes, modes, seeds,
                       versions, device and command line
      summary.json     {"schema": 1, "runs": [one object per run], "records": [files],
                       "skipped": [model x scenario pairs left out, with the reason],
                       "frontiers": [breaking points]}, rewritten after every run
      records/         while the suite runs: one Parquet file per recorded run
      records.parquet  once the suite has closed: those files as one long table (every
                       probe row plus ``train`` rows)
      report.html      the report, written from `read_run` once the directory is closed
                       (by ``precision-lab stress`` or ``precision-lab report``)
      failures/        KFAC's reproducers of failed decompositions, in failures/<run id>/
      .lock            locked (``flock``) by the one process writing the directory

Every planned run is in summary.json from the start, ``finished: false`` until it has
run, so a suite stopped by Ctrl-C or a crash says what it did not do. Every field's
definition is in `precision_lab.run.summary.FIELDS` (DESIGN.md's where it names the
field), and summary.json repeats them under ``fields``.

A kill at any instant (SIGKILL included) leaves every recorded run readable: each file
is written under a temporary name unique to the process and renamed into place, a run's
records are complete in their own file before summary.json lists that file under
``records``, and readers read only the files listed (a directory written before
``records`` existed has records.parquet alone). One process writes a directory: it
holds the lock from the start, and only an empty directory (or a new one) is accepted.

Non-finite numbers are written as null, so the JSON stays valid. `read_run` (through
`read_summary`) checks every run's figures (`precision_lab.run.summary.FIGURE_RULES`)
when a directory is read; the report, the baseline and `load_run` all read through it.
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
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from precision_lab.errors import UsageError
from precision_lab.run.frontiers import frontier_entries
from precision_lab.run.suite import RunPlan
from precision_lab.run.summary import (
    CONTROL_FIELDS,
    FIELDS,
    SUMMARY_FIELDS,
    broke,
    check_runs,
    failure_cause,
)
from probes.records import ARROW_SCHEMA, frame_from_rows, read_parquet, write_parquet

SUMMARY_SCHEMA = 1
RECORDS_FILE = "records.parquet"
RECORDS_DIR = "records"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
LOCK_FILE = ".lock"


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


def _write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    text = json.dumps(_jsonable(data), indent=indent, allow_nan=False) + "\n"
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
        if SUMMARY_FILE in found:
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
    return {
        **dict.fromkeys(SUMMARY_FIELDS),
        **plan.coordinates,
        "steps": 0,
        "finished": False,
        "diverged": False,
        "hyperparameters": plan.hyperparameters,
    }


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

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        plans: list[RunPlan],
        skipped: list[dict[str, str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.skipped = _jsonable(list(skipped or []))
        """The model x scenario pairs the suite left out, with why
        (`precision_lab.run.suite.Suite.skipped`), for summary.json's ``skipped``."""
        self._lock = _lock(self.path)
        self.failures = self.path / "failures"
        self.plans = plans
        # Run objects hold JSON values from the start (`_jsonable` applied once per run,
        # here and in `add`), so that rewriting summary.json after each of a suite's
        # hundreds of runs need not convert every run again.
        self.runs: dict[str, dict[str, Any]] = {p.run_id: _jsonable(planned_run(p)) for p in plans}
        self.records: list[str] = []
        """The records files summary.json lists, relative to the directory."""
        try:
            for folder in (self.failures, self.path / RECORDS_DIR):
                folder.mkdir()
        except OSError as err:
            raise UsageError(f"Cannot write in {self.path} ({err.strerror or err}).") from None
        _write_json(self.path / CONFIG_FILE, config)
        self.write_summary()

    def add(self, summary: dict[str, Any], records: pd.DataFrame) -> None:
        """Record one run's outcome: its records in a file of their own, then summary.json.

        Raises:
            KeyError: ``summary`` holds a field that `FIELDS` does not define.
        """
        unknown = set(summary) - set(FIELDS)
        if unknown:
            raise KeyError(f"summary fields {sorted(unknown)} are not defined in FIELDS")
        if len(records):
            name = f"{RECORDS_DIR}/{len(self.records) + 1:05d}.parquet"
            _atomic(self.path / name, partial(write_parquet, records))
            self.records.append(name)
        self.runs[summary["run"]].update(_jsonable(summary))
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
        """summary.json with every run so far and the frontiers computed from them
        (`precision_lab.run.frontiers.frontier_entries`: rungs not run yet are missing)."""
        runs = self.summary()
        summary = {
            "schema": SUMMARY_SCHEMA,
            "fields": FIELDS,
            "records": self.records,
            "runs": runs,
            "frontiers": _jsonable(frontier_entries(runs)),
            "skipped": self.skipped,
        }
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
        _atomic(self.path / SUMMARY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))

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

    def close(self) -> None:
        """Merge the records and release the directory's lock: the run is complete (the
        command that ran it writes report.html next, from `read_run`)."""
        self.merge_records()
        self.release()

    def release(self) -> None:
        """Let another process use the directory (the lock also ends with the process)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


_PART = re.compile(rf"{RECORDS_DIR}/\d{{5}}\.parquet")


def read_summary(root: Path) -> dict[str, Any]:
    """A run directory's summary.json, checked: ``{"schema", "fields", "runs": [...]}``.

    Every run must be an object whose figures have the types and ranges of
    `precision_lab.run.summary.FIGURE_RULES`; ``records``, where present, lists files of
    this directory only.

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
        data = json.loads((root / SUMMARY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{root} has no summary.json; it is not a precision-lab run directory."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{root / SUMMARY_FILE} is not valid JSON ({err}).") from None
    except (IsADirectoryError, PermissionError) as err:
        raise UsageError(f"{root / SUMMARY_FILE} cannot be read ({type(err).__name__}).") from None
    if (
        not isinstance(data, dict)
        or data.get("schema") != SUMMARY_SCHEMA
        or not isinstance(data.get("runs"), list)
    ):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UsageError(
            f"{root / SUMMARY_FILE} is not a precision-lab summary of schema "
            f"{SUMMARY_SCHEMA} (schema {found!r})."
        )
    path = root / SUMMARY_FILE
    check_runs(data["runs"], str(path))
    if not isinstance(data.get("frontiers", []), list):
        raise UsageError(f"{path} has frontiers that are not a list of entries.")
    records = data.get("records", [RECORDS_FILE])
    if not isinstance(records, list) or not all(
        isinstance(n, str) and (n == RECORDS_FILE or _PART.fullmatch(n)) for n in records
    ):
        raise UsageError(
            f"{path} has records = {records!r}, but records must list {RECORDS_FILE} or "
            f"{RECORDS_DIR}/NNNNN.parquet files of the run directory."
        )
    return data


def _read_config(path: Path) -> dict[str, Any] | None:
    """config.json as a dict; None where the directory has none.

    Raises:
        UsageError: It is not JSON, cannot be read, or is not an object.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}): rerun precision-lab "
            "stress."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} cannot be read ({type(err).__name__}).") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"{path} holds a {type(data).__name__}, but {CONFIG_FILE} must be an object."
        )
    return data


@dataclass(frozen=True)
class Run:
    """A run directory as read back, checked: what every reader (the report, the baseline,
    `load_run`) starts from.

    Attributes:
        path: The directory.
        runs: summary.json's run objects (`precision_lab.run.summary.FIELDS`), each
            checked against `precision_lab.run.summary.FIGURE_RULES`.
        config: config.json as a dict, or None where the directory has none.
        records_files: The records files summary.json lists, relative to ``path``.
    """

    path: Path
    runs: list[dict[str, Any]]
    config: dict[str, Any] | None
    records_files: tuple[str, ...] = field(repr=False)

    @cached_property
    def records(self) -> pd.DataFrame:
        """The long table of the records (`probes.records.COLUMNS`), read on first use (the
        gate never needs them).

        Raises:
            UsageError: A listed records file is missing, or not readable Parquet of the
                records' schema.
        """
        frames = []
        for name in self.records_files:
            if not (self.path / name).is_file():
                raise UsageError(f"{self.path} has no {name}; the run directory is incomplete.")
            try:
                frames.append(read_parquet(self.path / name))
            except ValueError as err:
                raise UsageError(str(err)) from None
        return pd.concat(frames, ignore_index=True) if frames else frame_from_rows([])

    @property
    def summary(self) -> pd.DataFrame:
        """One row per run, the ``control`` figures flattened into ``control.<field>``."""
        if not self.runs:
            return pd.DataFrame(columns=SUMMARY_FIELDS)
        return pd.json_normalize(self.runs, max_level=1)


def read_run(path: str | Path) -> Run:
    """Read a run directory: its summary (checked), config and records.

    Reads a directory whose suite was killed as well as a finished one: the records are
    those of the files summary.json lists.

    Raises:
        UsageError: (a ValueError) The directory, its summary.json, config.json or a
            listed records file is missing or corrupt, in one sentence.
    """
    root = Path(path)
    data = read_summary(root)
    files = tuple(data.get("records", [RECORDS_FILE]))
    return Run(root, data["runs"], _read_config(root / CONFIG_FILE), files)


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run directory's summary and records as DataFrames, for notebooks.

    Returns:
        ``(summary, records)``: one row per run (`Run.summary`) and the long table of
        the records (`Run.records`).

    Raises:
        ValueError: The directory, its summary.json or records are missing or corrupt,
            in one sentence.
    """
    run = read_run(path)
    return run.summary, run.records
