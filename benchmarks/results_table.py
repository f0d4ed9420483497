"""Writing a step benchmark's figures to `benchmarks/results/`: a JSON file and a table.

Shared by `test_singd_step.py` and `test_kfac_step.py`, so both record the same machine
facts (commit measured, processor, torch, threads, load before and after). Several
processes' results of one benchmark become one by `over_processes` (`repeat.py`): one
process's ratio carries the noise of its own memory and cache placement, which a median
over processes does not.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def source_version() -> str:
    """The commit measured, marked `+modified` if `singd/` differs from it (or `unknown`)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "singd"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+modified" if dirty else "")


def machine_info(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict:
    """What makes two result files comparable; load averages are 1-minute ones."""
    return {
        "commit": source_version(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "load_average_1min_before": load_before[0],
        "load_average_1min_after": load_after[0],
    }


def over_processes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' results of one benchmark as one: each figure's median.

    Args:
        records: one ``{"machine": ..., "rows": {name: row}}`` per process, in the order
            the processes ran; a row holds numbers (medians over that process's steps),
            ``ratio_cpu`` and ``target`` among them, and labels.

    Returns:
        ``{"machine": ..., "rows": ...}`` of the same shape. Each number of a row is its
        median over the processes that measured the row (a process whose test failed
        has none): ``ratio_cpu`` is the median of the processes' ratios, not the ratio
        of the median times; ``ratio_cpu_per_process`` lists those ratios, ``processes``
        counts them and ``meets_target`` judges the median (``ratio_cpu <= target``).
        The machine is the first process's with the commits measured, the number of
        processes, the 1-minute load average before the first and after the last, and
        ``load_average_1min_per_process`` ([before, after] each).
    """
    measured: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        for name, row in record["rows"].items():
            measured.setdefault(name, []).append(row)
    loads = [
        [r["machine"]["load_average_1min_before"], r["machine"]["load_average_1min_after"]]
        for r in records
    ]
    machine = records[0]["machine"] | {
        "commit": ", ".join(dict.fromkeys(r["machine"]["commit"] for r in records)),
        "processes": len(records),
        "load_average_1min_after": loads[-1][1],
        "load_average_1min_per_process": loads,
    }
    return {
        "machine": machine,
        "rows": {name: _median_row(rows) for name, rows in measured.items()},
    }


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the processes' rows: numbers by their median, labels as they are."""
    median = {
        key: statistics.median(row[key] for row in rows)
        if isinstance(value, int | float) and not isinstance(value, bool)
        else value
        for key, value in rows[0].items()
    }
    return median | {
        "ratio_cpu_per_process": [row["ratio_cpu"] for row in rows],
        "processes": len(rows),
        "meets_target": median["ratio_cpu"] <= median["target"],
    }


VERDICT_COLUMNS = "ratio (CPU) | min-max over processes | processes | target | met"
"""The Markdown header cells that `verdict_cells` fills."""


def verdict_cells(row: dict[str, Any]) -> str:
    """A row of `over_processes` as Markdown cells under `VERDICT_COLUMNS`."""
    ratios = row["ratio_cpu_per_process"]
    return (
        f"{row['ratio_cpu']:.3f} | {min(ratios):.3f}-{max(ratios):.3f} | {row['processes']} "
        f"| <= {row['target']} | {'yes' if row['meets_target'] else 'NO'}"
    )


def write_results(
    stem: str,
    machine: dict,
    rows: dict[str, dict[str, Any]],
    lines: list[str],
    directory: Path = RESULTS,
) -> None:
    """Write ``DIRECTORY/STEM.json`` (machine and rows) and ``DIRECTORY/STEM.md`` (lines)."""
    directory.mkdir(exist_ok=True)
    (directory / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n"
    )
    (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
