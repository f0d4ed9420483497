"""Gate baselines: the summary figures of every run of a stress run, frozen in one JSON file.

A baseline is what a later run directory is gated against (``precision_lab.gate.checks``). It keeps,
for every run of the suite (float32 controls included), the figures DESIGN.md defines for a
run object, together with the suite's name, the environment the figures were measured in,
and a schema version, so that a baseline from another suite or an older format is refused
rather than misread.

Runs are identified across run directories by their key ``(model, scenario, optimizer,
dtype, mode, seed)``, never by their ``run`` id, which names a run only inside its own
directory. A float32 control (``control_of`` set) shares model, scenario, optimizer and seed
with the run it controls; its key carries the controlled run's dtype and mode as ``role``
(``"control of bfloat16/pure"``), so that it never collides with a float32 run of the suite.

Units of the stored figures are DESIGN.md's: bytes (``optimizer_state_bytes``,
``peak_memory_bytes``), steps (``first_nonfinite_step``), counts of steps (``nan_events``,
``inf_events``, ``skipped_steps``, ``overflow_events``), a fraction in [0, 1]
(``underflow_fraction``, ``accuracy``), milliseconds (``step_time_ms``) and the loss's own
units (``final_loss``). Non-finite figures are stored as null, as in summary.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precision_lab import __version__
from precision_lab.errors import UsageError
from precision_lab.gate.frontiers import (
    Frontier,
    FrontierKey,
    frontier_document,
    frontier_from_entry,
    index_frontiers,
    read_frontier,
)
from precision_lab.run.directory import SUMMARY_FILE, read_run
from precision_lab.run.frontiers import frontier_entries
from precision_lab.run.summary import FIGURES, KEY_FIELDS, broke, check_run

ADDED_FIGURES = ("peak_tensor_bytes",)
"""Figures added after files of this schema were first written: a baseline without one
stays readable, and the gate says it was not compared there (`checks.Bytes`)."""
REQUIRED_FIGURES = tuple(name for name in FIGURES if name not in ADDED_FIGURES)

BASELINE_FORMAT = "precision-lab-baseline"
BASELINE_SCHEMA = 1

# Suite settings that change every figure, and the seeds: runs made with other values are not
# comparable (and a baseline of other seeds would judge breaking by other luck).
SETTINGS = ("steps", "batch_size", "every", "world_size", "seeds")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, order=True)
class RunKey:
    """What identifies a run across run directories.

    Attributes:
        model, scenario, optimizer, dtype, mode, seed: the suite's coordinates of the run
            (dtype as a torch name, optimizer as its spec string).
        role: empty for a run of the suite; ``"control of DTYPE/MODE"`` for the float32
            control of the run with that dtype and mode.
    """

    model: str
    scenario: str
    optimizer: str
    dtype: str
    mode: str
    seed: int
    role: str = ""

    @property
    def label(self) -> str:
        """The key in one line, as messages and tables name the run."""
        text = "/".join(
            (self.model, self.scenario, self.optimizer, self.dtype, self.mode, f"seed{self.seed}")
        )
        return f"{text} ({self.role})" if self.role else text

    @property
    def config(self) -> tuple[str, ...]:
        """What the seeds of one configuration share: every coordinate but the seed."""
        return (self.model, self.scenario, self.optimizer, self.dtype, self.mode, self.role)

    @property
    def config_label(self) -> str:
        """The label of the key's configuration, any seed: ``.../pure/seed*``."""
        text = "/".join((*self.config[:5], "seed*"))
        return f"{text} ({self.role})" if self.role else text

    def as_dict(self) -> dict[str, Any]:
        """The key as a JSON object."""
        return {name: getattr(self, name) for name in (*KEY_FIELDS, "role")}


@dataclass
class RunSet:
    """The runs of one run directory or baseline, indexed by key.

    Attributes:
        suite: the suite's name (``quick``, ``default``, ``full`` or a TOML file's name).
        runs: figures of each run, by key (a dict of DESIGN.md's run-object fields).
        settings: the suite settings in ``SETTINGS`` (steps, batch size, probe cadence,
            world size), which must agree for runs to be compared.
        environment: where the figures were measured (versions, device, host).
        source: the run directory or baseline file the runs came from, for messages.
        frontiers: the breaking points of its frontiers, by key (none for a suite without
            frontiers, or a baseline written before they existed).
    """

    suite: str
    runs: dict[RunKey, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    frontiers: dict[FrontierKey, Frontier] = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist.") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise UsageError(f"{what} {path} cannot be read ({error.__class__.__name__}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}): "
            "regenerate it."
        ) from None


def suite_name(suite: Any) -> str:
    """The name of a suite as config.json records it: a name, or a table with a ``name``."""
    if isinstance(suite, str):
        return suite
    if isinstance(suite, dict) and isinstance(suite.get("name"), str):
        return suite["name"]
    raise UsageError(f"config.json names no suite (found {suite!r}): rerun precision-lab stress.")


def _key_of(run: dict[str, Any], by_id: dict[Any, dict[str, Any]], source: str) -> RunKey:
    role = ""
    controlled = run.get("control_of")
    if controlled is not None:
        target = by_id.get(controlled)
        if target is None:
            raise UsageError(
                f"Run {run['run']!r} in {source} is the control of run {controlled!r}, "
                "which is not in the same summary."
            )
        role = f"control of {target['dtype']}/{target['mode']}"
    return RunKey(*(run[name] for name in KEY_FIELDS), role=role)


def index_runs(runs: list[dict[str, Any]], source: str) -> dict[RunKey, dict[str, Any]]:
    """Index run objects by key, refusing two runs with the same key.

    Args:
        runs: run objects as `precision_lab.run.directory.read_run` returns them (their
            fields already checked).
        source: where they came from, for the error message.

    Returns:
        Each run object (unchanged) under its ``RunKey``, in the summary's order.
    """
    for run in runs:
        missing = [name for name in (*KEY_FIELDS, "run") if name not in run]
        if missing:
            raise UsageError(
                f"A run in {source} lacks the fields {', '.join(missing)}: it was not written "
                "by precision-lab stress (summary schema 1)."
            )
        # read_run checked every field's type; a key's fields may not be null either.
        key = {name: run[name] for name in KEY_FIELDS}
        check_run(key, repr(run["run"]), source, key_fields=KEY_FIELDS)
    by_id = {run.get("run"): run for run in runs}
    indexed: dict[RunKey, dict[str, Any]] = {}
    for run in runs:
        key = _key_of(run, by_id, source)
        if key in indexed:
            raise UsageError(f"{source} holds two runs with the same key {key.label}.")
        indexed[key] = run
    return indexed


def read_run_dir(path: str | Path) -> RunSet:
    """Read a run directory (`precision_lab.run.directory.read_run`) as a `RunSet`.

    Args:
        path: a directory written by ``precision-lab stress``.

    Returns:
        Its runs by key, the suite's name, the environment from config.json, and its
        frontiers recomputed from the runs (``precision_lab.run.frontiers``).

    Raises:
        UsageError: the directory, or its summary or config, is missing or corrupt.
    """
    run = read_run(path)
    config = run.config
    if config is None:
        raise UsageError(f"Run configuration {run.path / 'config.json'} does not exist.")
    environment = {
        "versions": config.get("versions"),
        "device": config.get("device"),
        "command": config.get("command"),
    }
    try:
        entries = frontier_entries(run.runs)
    except ValueError as error:  # a knob no version of the suite declares
        raise UsageError(f"{run.path / SUMMARY_FILE}: {error}") from None
    return RunSet(
        suite=suite_name(config.get("suite")),
        runs=index_runs(run.runs, str(run.path / SUMMARY_FILE)),
        settings={name: config.get(name) for name in SETTINGS},
        environment=environment,
        source=str(run.path),
        frontiers=index_frontiers(map(frontier_from_entry, entries), str(run.path)),
    )


def host_environment() -> dict[str, Any]:
    """The machine a baseline is made on: enough to tell a baseline from another machine."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "precision_lab": __version__,
    }


def _finite_or_null(value: Any) -> Any:
    # summary.json already writes non-finite numbers as null; a baseline keeps that promise
    # even for figures handed over in memory, so that the file stays strict JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {name: _finite_or_null(item) for name, item in value.items()}
    return value


def make_baseline(run_set: RunSet) -> dict[str, Any]:
    """The baseline document for a run directory's runs.

    Returns:
        ``{"format", "schema", "suite", "settings", "created", "environment", "source",
        "runs", "frontiers"}``, each run a ``{"key": {...}, "run": id, "figures": {...}}``
        object, in the summary's order; each frontier its key, ladder, rung statuses and
        breaking points (`precision_lab.gate.frontiers.frontier_document`).

    Raises:
        UsageError: a run stopped without a result (interrupted, not raised: a run that
            raised broke, and is kept); a baseline must hold a whole suite's figures.
    """
    unfinished = [key.label for key, run in run_set.runs.items() if broke(run) is None]
    if unfinished:
        raise UsageError(
            f"{len(unfinished)} run(s) of {run_set.source} did not finish (first: "
            f"{unfinished[0]}): make a baseline from a complete suite."
        )
    environment = {**run_set.environment, "host": host_environment()}
    return {
        "format": BASELINE_FORMAT,
        "schema": BASELINE_SCHEMA,
        "suite": run_set.suite,
        "settings": run_set.settings,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "environment": environment,
        "source": run_set.source,
        "runs": [
            {
                "key": key.as_dict(),
                "run": run.get("run"),
                "figures": {name: _finite_or_null(run.get(name)) for name in FIGURES},
            }
            for key, run in run_set.runs.items()
        ],
        "frontiers": [frontier_document(frontier) for frontier in run_set.frontiers.values()],
    }


def write_baseline(run_dir: str | Path, output: str | Path) -> dict[str, Any]:
    """Read a run directory and write its baseline to ``output`` (JSON, sorted keys)."""
    document = make_baseline(read_run_dir(run_dir))
    target = Path(output)
    if target.parent != Path() and not target.parent.is_dir():
        raise UsageError(f"Cannot write {target}: its directory {target.parent} does not exist.")
    target.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return document


def configurations(keys: Iterable[RunKey]) -> dict[tuple[str, ...], list[RunKey]]:
    """The keys of each configuration (`RunKey.config`: its seeds), in the order given."""
    seeds: dict[tuple[str, ...], list[RunKey]] = {}
    for key in keys:
        seeds.setdefault(key.config, []).append(key)
    return seeds


def _check_seed_counts(runs: dict[RunKey, dict[str, Any]], where: str) -> None:
    """Refuse stored seed counts that its runs contradict: the gate counts the runs."""
    seeds = configurations(runs)
    for key, run in runs.items():
        configuration = [runs[other] for other in seeds[key.config]]
        counted = {
            "seeds_broken": sum(bool(broke(other)) for other in configuration),
            "seeds_total": len(configuration),
        }
        for name, count in counted.items():
            if run.get(name) is not None and run[name] != count:
                raise UsageError(
                    f"{where}: run {key.label} has {name} = {run[name]}, but its "
                    f"configuration's runs count {count}; refresh it."
                )


def read_baseline(path: str | Path) -> RunSet:
    """Read a baseline file written by ``write_baseline``.

    A baseline written before frontiers existed has no ``frontiers``: it is read with
    none, and gates no breaking point.

    Raises:
        UsageError: the file is missing, not JSON, not a baseline, or of another schema, or
            a run or frontier in it is corrupt.
    """
    target = Path(path)
    document = _read_json(target, "Baseline")
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT:
        raise UsageError(
            f"{target} is not a precision-lab baseline: make one with "
            "'precision-lab baseline RUN_DIR -o FILE.json'."
        )
    if document.get("schema") != BASELINE_SCHEMA:
        raise UsageError(
            f"Baseline {target} has schema {document.get('schema')!r}, but this version reads "
            f"schema {BASELINE_SCHEMA}: refresh it (reports/baselines/README.md)."
        )
    runs: dict[RunKey, dict[str, Any]] = {}
    where = f"Baseline {target} is corrupt"
    try:
        for entry in document["runs"]:
            label = _shown(entry.get("run"))
            check_run(entry["key"], label, where, key_fields=(*KEY_FIELDS, "role"))
            key = RunKey(**entry["key"])
            check_run(entry["figures"], key.label, where, complete=REQUIRED_FIGURES)
            runs[key] = {**entry["figures"], **entry["key"], "run": entry.get("run")}
        suite = document["suite"]
    except (KeyError, TypeError, AttributeError) as error:
        raise UsageError(
            f"Baseline {target} is corrupt ({error.__class__.__name__}: {error}): refresh it."
        ) from None
    _check_seed_counts(runs, where)
    stored = document.get("frontiers", [])
    if not isinstance(stored, list):
        raise UsageError(f"{where}: its frontiers must be a list; refresh it.")
    frontiers = index_frontiers((read_frontier(entry, where) for entry in stored), str(target))
    settings = document.get("settings") or {}
    if not isinstance(settings, dict) or not isinstance(document.get("environment") or {}, dict):
        raise UsageError(f"{where}: its settings and environment must be objects; refresh it.")
    return RunSet(
        suite=suite_name(suite),
        runs=runs,
        settings=settings,
        environment=document.get("environment") or {},
        source=str(target),
        frontiers=frontiers,
    )
