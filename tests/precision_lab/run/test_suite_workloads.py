"""Suites name workloads by import path; a condition that means nothing for a workload is
left out with its reason."""

import json

import pytest

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
