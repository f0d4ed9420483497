"""Suites name workloads by import path; a condition that means nothing for a workload is
left out with its reason, and the run directory records why."""

import json

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.errors import UsageError
from precision_lab.run.suite import parse_suite

WORKLOAD = """
import torch
from precision_lab import Workload

def batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(32, 6, generator=g)
        yield x, (x[:, 0] > 0).long()

def build():
    return Workload(lambda: torch.nn.Linear(6, 2), batches, name="{name}")
"""

SUITE = """
dtypes = ["bf16"]
steps = 3
[[matrix]]
models = {models}
scenarios = ["baseline", "input_scale=1024"]
optimizers = ["singd:diagonal", "adamw"]
"""


@pytest.fixture
def workload_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(WORKLOAD.format(name="linear"))
    return path


def test_a_suite_runs_a_workload_by_path_under_its_own_name(workload_file):
    suite = parse_suite(SUITE.format(models=json.dumps([f"{workload_file}:build"])), "s.toml")
    plans = suite.plan()
    assert {p.model for p in plans} == {"linear"}
    assert {p.source for p in plans} == {f"{workload_file}:build"}
    assert {p.scenario for p in plans} == {"baseline", "input_scale=1024"}
    assert plans[0].run_id.startswith("linear/")


def test_input_scaling_is_skipped_for_token_inputs_with_a_reason():
    suite = parse_suite(SUITE.format(models='["mlp", "lm"]'), "s.toml")
    plans = suite.plan()
    scaled = {p.model for p in plans if p.scenario == "input_scale=1024"}
    assert scaled == {"mlp"}
    assert {p.model for p in plans if p.scenario == "baseline"} == {"mlp", "lm"}
    assert suite.skipped() == [
        {
            "model": "lm",
            "scenario": "input_scale=1024",
            "reason": "input_scale=1024 scales floating inputs, and the inputs of lm have none "
            "(integer token ids or labels only)",
        }
    ]


def test_two_workloads_of_one_name_are_refused(tmp_path, workload_file):
    other = tmp_path / "other.py"
    other.write_text(WORKLOAD.format(name="linear"))
    models = json.dumps([f"{workload_file}:build", f"{other}:build"])
    with pytest.raises(UsageError, match="are both named 'linear'"):
        parse_suite(SUITE.format(models=models), "s.toml")


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
    suite.write_text(SUITE.format(models='["lm"]').replace('"adamw"', '"sgd"'))
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
    from precision_lab.cli.stress import _metric_header

    digits, lm, mine = ({"metric_name": n} for n in ("test_accuracy", "answer_accuracy", "f1"))
    assert _metric_header([digits, {"metric_name": None}]) == "accuracy"
    assert _metric_header([lm, lm]) == "answer_accuracy"
    assert _metric_header([digits, lm]) == "metric"
    assert _metric_header([lm, mine]) == "metric"
