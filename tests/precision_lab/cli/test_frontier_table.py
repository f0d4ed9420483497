"""The terminal's frontier table: a line per seed, the median after them, the rungs drawn."""

from __future__ import annotations

from rich.console import Console

from precision_lab.cli.stress import frontier_table
from precision_lab.run.frontiers import frontier_entries
from tests.precision_lab.run.test_frontiers import _ladder


def _text(entries) -> str:
    console = Console(width=250, record=True, force_terminal=False)
    console.print(frontier_table(entries))
    return console.export_text()


def test_one_line_per_seed_then_the_median():
    runs = []
    for seed, outcomes in enumerate(
        [["held", "broke", "broke", "broke", "broke"], ["held"] * 3 + ["broke"] * 2]
    ):
        runs += _ladder(outcomes, ["held"] * 4 + ["broke"], seed=seed)
    text = _text(frontier_entries(runs))
    lines = [line for line in text.splitlines() if "kfac:cholesky" in line]
    assert len(lines) == 3
    assert "costs 3 rungs" in lines[0] and ".xxxx" in lines[0] and "....x" in lines[0]
    assert "costs 1 rung" in lines[1] and " 0.0001 " in lines[1]
    assert "median" in lines[2] and " 2 " in lines[2]  # median of 3 and 1
    assert "0.1 -> 1e-05 (5)" in lines[0]


def test_held_everywhere_and_lower_bounds_read_plainly():
    runs = _ladder(["held"] * 5, ["held"] * 5) + _ladder(
        ["held", "held", "broke", "broke", "broke"], ["held"] * 5, optimizer="singd:diagonal"
    )
    text = _text(frontier_entries(runs))
    kfac = next(line for line in text.splitlines() if "kfac:cholesky" in line)
    singd = next(line for line in text.splitlines() if "singd:diagonal" in line)
    assert "held everywhere" in kfac and "median" not in text
    assert "costs at least 3 rungs" in singd and " 3+ " in singd and " 0.001 " in singd
