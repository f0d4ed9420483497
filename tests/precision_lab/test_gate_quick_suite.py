"""The gate on a real quick-suite run: its own baseline passes, injected regressions fail.

The quick suite runs once per test session in float32 (real training on the digits, real
probes, a real run directory); each test copies the run directory and edits one figure
of one real run in its summary.json, as a regressing change would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from precision_lab.baseline import read_run_dir
from precision_lab.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    args = ["stress", "--suite", "quick", "--dtype", "fp32", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def quick_baseline(quick_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "quick-fp32.json"
    result = CliRunner().invoke(cli, ["baseline", str(quick_run), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def edited_copy(quick_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the quick run whose summary.json has been changed by ``edit(runs)``."""
    copy = tmp_path / "edited"
    shutil.copytree(quick_run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    edit(summary["runs"])
    (copy / "summary.json").write_text(json.dumps(summary, allow_nan=False))
    return copy


def gate_json(run_dir: Path, baseline: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(baseline), "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def test_a_run_passes_its_own_baseline(quick_run, quick_baseline):
    code, data = gate_json(quick_run, quick_baseline)
    assert code == 0, data["failures"]
    runs = read_run_dir(quick_run).runs
    checked = {check["run"] for check in data["checks"] if check["status"] in ("ok", "skip")}
    assert checked == {key.label for key in runs}
    # The suite really ran: every run finished with its optimizer state accounted for.
    assert all(run["finished"] and run["optimizer_state_bytes"] > 0 for run in runs.values())


def _kronecker_run(runs: list[dict]) -> dict:
    """A finished run of a Kronecker optimizer that kept finite figures."""
    return next(
        run
        for run in runs
        if run["optimizer"].startswith(("singd", "kfac"))
        and not run["diverged"]
        and run["max_condition"] is not None
    )


def _label(run: dict) -> str:
    return "/".join(
        [run["model"], run["scenario"], run["optimizer"], run["dtype"], run["mode"]]
        + [f"seed{run['seed']}"]
    )


def _state(run):
    run["optimizer_state_bytes"] = round(run["optimizer_state_bytes"] * 1.1)


def _nan(run):
    run.update(nan_events=1, first_nonfinite_step=run["steps"] - 1)


def _condition(run):
    run["max_condition"] *= 100


def _loss(run):
    run["final_loss"] *= 1.2


def _earlier(run):
    # A divergence whose first non-finite step comes at a third of the baseline's step.
    run.update(diverged=True, first_nonfinite_step=max(1, run["steps"] // 3))


@pytest.mark.parametrize(
    ("edit", "figure"),
    [
        pytest.param(_state, "optimizer_state_bytes", id="10% more optimizer state"),
        pytest.param(_nan, "nan_events", id="a new NaN"),
        pytest.param(_condition, "max_condition", id="condition number 100x larger"),
        pytest.param(_loss, "final_loss", id="worse loss"),
        pytest.param(_earlier, "diverged", id="a new divergence"),
    ],
)
def test_injected_regressions_fail(quick_run, quick_baseline, tmp_path, edit, figure):
    target: dict = {}

    def inject(runs):
        run = _kronecker_run(runs)
        target.update(run)
        edit(run)

    code, data = gate_json(edited_copy(quick_run, tmp_path, inject), quick_baseline)
    assert code == 1
    assert any(
        message.startswith(f"{_label(target)}: ") and figure in message
        for message in data["failures"]
    ), data["failures"]


def test_a_missing_real_run_fails_coverage(quick_run, quick_baseline, tmp_path):
    removed: list[dict] = []

    def drop(runs):
        removed.append(runs.pop())

    code, data = gate_json(edited_copy(quick_run, tmp_path, drop), quick_baseline)
    assert code == 1
    assert data["failures"] == [
        f"{_label(removed[0])}: run is in the baseline but missing from {tmp_path / 'edited'}"
    ]


def test_the_committed_float32_baseline_still_holds(quick_run):
    """This session's quick run against reports/baselines/quick-suite-fp32.json.

    A change that moves the figures fails here as it fails CI: refresh the baselines
    deliberately (reports/baselines/README.md). Peak memory is left out (a floor of
    1 TiB): inside pytest it is the resident memory of a process that has run other
    tests, not of a fresh ``precision-lab stress`` as in CI.
    """
    committed = Path(__file__).resolve().parents[2] / "reports/baselines/quick-suite-fp32.json"
    args = ["gate", str(quick_run), "--baseline", str(committed), "--peak-floor", "1024GiB"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, json.loads(result.output)["failures"]
