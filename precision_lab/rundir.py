"""The run directory a stress suite writes, and `load_run`, which reads it back.

::

    RUN_DIR/
      config.json      the suite (its TOML text), optimizers, dtypes, modes, seeds,
                       versions, device and command line
      summary.json     {"schema": 1, "runs": [one object per run]}, rewritten after every run
      records.parquet  the long table: every probe row plus ``train`` rows
      report.html      the report
      failures/        KFAC's reproducers of failed decompositions, in failures/<run id>/

Every planned run is in summary.json from the start, ``finished: false`` until it has
run, so a suite stopped by Ctrl-C or a crash says what it did not do. Every field's
definition is in `FIELDS` (DESIGN.md's where it names the field), and summary.json
repeats them under ``fields``.

Non-finite numbers are written as null, so the JSON stays valid.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from precision_lab.dtypes import dtype_name
from precision_lab.errors import UsageError
from precision_lab.report import write_report
from precision_lab.suite import RunPlan
from probes.records import ARROW_SCHEMA, COLUMNS, read_parquet

SUMMARY_SCHEMA = 1

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


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader (or a Ctrl-C) never sees a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


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
        path: The directory (created; it must not hold a previous run's summary).
        config: The content of config.json.
        plans: Every run of the suite, in order.
    """

    def __init__(self, path: Path, config: dict[str, Any], plans: list[RunPlan]) -> None:
        self.path = Path(path)
        if (self.path / "summary.json").exists():
            raise UsageError(
                f"{self.path} already holds a run (summary.json): pass a new --out directory."
            )
        self.failures = self.path / "failures"
        self.failures.mkdir(parents=True, exist_ok=True)
        _write_json(self.path / "config.json", config)
        self.plans = plans
        self.runs: dict[str, dict[str, Any]] = {p.run_id: planned_run(p) for p in plans}
        self._writer = pq.ParquetWriter(str(self.path / "records.parquet"), ARROW_SCHEMA)
        self.write_summary()

    def add(self, summary: dict[str, Any], records: pd.DataFrame) -> None:
        """Record one run's outcome: append its records, rewrite summary.json."""
        self.runs[summary["run"]].update(summary)
        if len(records):
            table = pa.Table.from_pandas(
                records[list(COLUMNS)], schema=ARROW_SCHEMA, preserve_index=False
            )
            self._writer.write_table(table)
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
        summary = {"schema": SUMMARY_SCHEMA, "fields": FIELDS, "runs": self.summary()}
        _write_json(self.path / "summary.json", summary)

    def close(self) -> None:
        """Finish records.parquet (its footer) and write report.html."""
        self._writer.close()
        write_report([self.path], self.path / "report.html")


def read_summary(root: Path) -> dict[str, Any]:
    """A run directory's summary.json, checked: ``{"schema", "fields", "runs": [...]}``.

    Raises:
        UsageError: (a ValueError) the directory or its summary.json is missing, not
            JSON, or not a summary of `SUMMARY_SCHEMA`, in one sentence.
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
    return data


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run directory's summary and records as DataFrames, for notebooks.

    Returns:
        ``(summary, records)``: one row per run (the ``control`` figures flattened into
        ``control.<field>`` columns), and the long table of records.parquet.

    Raises:
        ValueError: The directory, its summary.json or records.parquet is missing or
            corrupt, in one sentence.
    """
    root = Path(path)
    data = read_summary(root)
    records_path = root / "records.parquet"
    if not records_path.is_file():
        raise ValueError(f"{root} has no records.parquet; the run directory is incomplete.")
    records = read_parquet(records_path)
    summary = (
        pd.json_normalize(data["runs"], max_level=1)
        if data["runs"]
        else pd.DataFrame(columns=SUMMARY_FIELDS)
    )
    return summary, records
