"""`precision-lab stress` on workloads: a bad path stops it before anything runs, what a
suite skips for a workload is recorded and printed, and the table names a workload's
metric."""

import json

from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.cli.stress import _metric_header

SUITE = """
dtypes = ["bf16"]
steps = 3
[[matrix]]
models = ["lm"]
scenarios = ["baseline", "input_scale=1024"]
optimizers = ["singd:diagonal", "sgd"]
"""


def test_a_bad_model_path_stops_stress_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["stress", "--suite", "quick", "--models", "nowhere.py:build", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "Model 'nowhere.py:build': the file nowhere.py does not exist." in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_the_run_directory_records_what_was_skipped_and_why(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["stress", "--suite", str(suite), "--device", "cpu", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["scenario"] for s in summary["skipped"]] == ["input_scale=1024"]
    assert {r["scenario"] for r in summary["runs"]} == {"baseline"}
    assert "Skipped lm x input_scale=1024: input_scale=1024 scales floating inputs" in " ".join(
        result.output.split()
    )


def test_the_table_names_a_workloads_own_metric():
    digits, lm, mine = ({"metric_name": n} for n in ("test_accuracy", "answer_accuracy", "f1"))
    assert _metric_header([digits, {"metric_name": None}]) == "accuracy"
    assert _metric_header([lm, lm]) == "answer_accuracy"
    assert _metric_header([digits, lm]) == "metric"
    assert _metric_header([lm, mine]) == "metric"
