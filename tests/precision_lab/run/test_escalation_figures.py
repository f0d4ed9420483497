"""The runner's escalation figures when a +auto KFAC run ends right after a statistic went
non-finite: KFAC drops that statistic from its state (and its curvature view) until the
next update, and the summary must still be written (once a KeyError)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.run.directory import read_run


def test_figures_survive_a_dropped_statistic(tmp_path):
    out = tmp_path / "run"
    args = ["stress", "--suite", "quick", "--dtype", "fp16", "--scenarios", "input_scale=16384"]
    args += ["--optimizers", "kfac:cholesky+auto", "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "summary.json").read_text())["runs"]
    run = next(r for r in runs if r["dtype"] == "float16")
    assert run["error"] is None
    records = read_run(out).records
    events = records[(records["run"] == run["run"]) & (records["probe"] == "precision")]
    assert run["precision_events"] == len(events) > 0
    dropped = events[(events["metric"] == "nonfinite") & events["tensor"].isin(["A", "G"])]
    assert not dropped.empty  # the case under test: a statistic restarted at step 0
    # The factors still held (whatif's stored_bytes at the run's one step, 0): the
    # promoted ones are those no longer in float16.
    stored = records[
        (records["run"] == run["run"])
        & (records["metric"] == "stored_bytes")
        & records["tensor"].isin(["A", "G", "A_inv", "G_inv"])
    ]
    wider = stored[stored["dtype"] != "float16"]
    assert len(stored) < 4 * stored["module"].nunique()  # the dropped ones are not counted
    assert run["promoted_fraction"] == len(wider) / len(stored)
    assert run["promoted_bytes"] == wider["value"].sum() / 2  # float16 -> float32: half is new
