"""Writing a step benchmark's figures to `benchmarks/results/`: a JSON file and a table.

Shared by `test_singd_step.py` and `test_kfac_step.py`, so both record the same machine
facts (commit measured, processor, torch, threads, load before and after).
"""

from __future__ import annotations

import json
import platform
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


def write_results(
    stem: str, machine: dict, rows: dict[str, dict[str, Any]], lines: list[str]
) -> None:
    """Write ``results/STEM.json`` (machine and rows) and ``results/STEM.md`` (lines)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n"
    )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
