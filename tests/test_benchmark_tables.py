"""The SINGD step benchmark's verdict over several processes (`over_processes`,
`verdict_cells`, `write_results` in benchmarks/results_table.py, loaded by file path:
benchmarks/ is no package and not on the test path)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "results_table", ROOT / "benchmarks" / "results_table.py"
)
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)


def record(commit: str, loads: tuple[float, float], **ratios: float) -> dict:
    """One process's result: a row per keyword, `ratio_cpu` = its value, ours 2x it ms.
    Each row's own verdict is deliberately wrong: the aggregate must judge again."""
    rows = {
        name: {
            "baseline": "adamw",
            "ours_cpu_ms": 2.0 * ratio,
            "baseline_cpu_ms": 2.0,
            "ratio_cpu": ratio,
            "ours_page_faults": 0,
            "target": 1.0,
            "meets_target": ratio > 1.0,
        }
        for name, ratio in ratios.items()
    }
    machine = {
        "commit": commit,
        "load_average_1min_before": loads[0],
        "load_average_1min_after": loads[1],
    }
    return {"machine": machine, "rows": rows}


RECORDS = [
    record("abc", (0.5, 1.0), diagonal=1.03, dense=1.04),
    record("abc", (1.0, 1.1), diagonal=0.97, dense=0.99),
    record("abc", (1.1, 1.2), diagonal=1.02),
]


def test_each_figure_is_its_median_over_the_processes_that_measured_it():
    rows = results_table.over_processes(RECORDS)["rows"]
    assert list(rows) == ["diagonal", "dense"]
    diagonal = rows["diagonal"]
    assert diagonal["ratio_cpu"] == 1.02
    assert diagonal["ours_cpu_ms"] == pytest.approx(2.04)
    assert diagonal["ratio_cpu_per_process"] == [1.03, 0.97, 1.02]
    assert diagonal["processes"] == 3
    assert diagonal["baseline"] == "adamw"
    assert diagonal["target"] == 1.0
    # The third process has no dense row: the median of two is their mean.
    assert rows["dense"]["processes"] == 2
    assert rows["dense"]["ratio_cpu"] == pytest.approx(1.015)


def test_the_verdict_judges_the_median_not_one_process():
    # One process met 1.0 (0.97), the median 1.02 does not; each process's own verdict
    # says the opposite of its ratio, the first's included.
    assert results_table.over_processes(RECORDS)["rows"]["diagonal"]["meets_target"] is False
    met = results_table.over_processes(
        [record("abc", (1.0, 1.0), diagonal=r) for r in (0.99, 1.01, 0.98)]
    )
    assert met["rows"]["diagonal"]["meets_target"] is True


def test_the_machine_keeps_the_load_before_the_first_and_after_the_last_process():
    machine = results_table.over_processes([*RECORDS, record("def", (0.9, 0.8), diagonal=1.0)])[
        "machine"
    ]
    assert machine["processes"] == 4
    assert machine["load_average_1min_before"] == 0.5
    assert machine["load_average_1min_after"] == 0.8
    assert machine["load_average_1min_per_process"] == [
        [0.5, 1.0],
        [1.0, 1.1],
        [1.1, 1.2],
        [0.9, 0.8],
    ]
    assert machine["commit"] == "abc, def"


def test_one_process_is_its_own_median_and_the_table_says_so(tmp_path):
    result = results_table.over_processes(RECORDS[1:2])
    row = result["rows"]["diagonal"]
    assert row["ratio_cpu"] == 0.97
    cells = results_table.verdict_cells(row)
    assert cells == "0.970 | 0.970-0.970 | 1 | <= 1.0 | yes"
    assert cells.count("|") == results_table.VERDICT_COLUMNS.count("|")
    assert results_table.verdict_cells(results_table.over_processes(RECORDS)["rows"]["dense"]) == (
        "1.015 | 0.990-1.040 | 2 | <= 1.0 | NO"
    )

    results_table.write_results("step", result["machine"], result["rows"], ["| a |", "x"], tmp_path)
    assert (tmp_path / "step.md").read_text() == "| a |\nx\n"
    assert json.loads((tmp_path / "step.json").read_text()) == result
