"""The run directory: failure causes, strict JSON, summaries kept after every run, load_run."""

import json

import pandas as pd
import pytest
import torch

from precision_lab import load_run
from precision_lab.errors import UsageError
from precision_lab.run.directory import RunDirectory, read_run
from precision_lab.run.suite import parse_suite
from precision_lab.run.summary import SUMMARY_FIELDS, failure_cause
from probes.records import frame_from_rows

SUITE = """
models = ["mlp"]
scenarios = ["baseline"]
optimizers = ["adamw"]
dtypes = ["bf16"]
seeds = [0, 1, 2]
steps = 3
"""


def done(diverged=False, error=None, finished=True, learned=True):
    return {"finished": finished, "diverged": diverged, "error": error, "learned": learned}


@pytest.mark.parametrize(
    ("run", "control", "cause"),
    [
        (done(), done(), "none"),
        (done(diverged=True), done(), "precision"),
        (done(diverged=True), done(diverged=True), "optimization"),
        (done(error="LinAlgError: x"), done(), "precision"),
        (done(diverged=True), done(error="RuntimeError: y"), "optimization"),
        (done(diverged=True), None, "optimization"),  # a float32 run that broke
        (done(), None, "none"),
        (done(finished=False), done(), None),  # unfinished: unknown
        (done(diverged=True), done(finished=False), None),  # control unfinished: unknown
        (done(), done(diverged=True), "none"),  # held while its control broke
        # A control that held without learning says nothing about the dtype.
        (done(diverged=True), done(learned=False), "no_learning"),
        (done(error="LinAlgError: x"), done(learned=False), "no_learning"),
        (done(diverged=True), done(learned=None), None),  # control's learning unknown
        (done(), done(learned=False), "none"),
    ],
)
def test_failure_cause(run, control, cause):
    assert failure_cause(run, control) == cause


def _outcome(plan, **figures):
    summary = {"run": plan.run_id, "finished": True, "steps": plan.steps, **figures}
    rows = [(plan.run_id, s, 0, "train", "", "loss", "", "", "loss", 1.0, "") for s in range(3)]
    return summary, frame_from_rows(rows)


def test_summary_after_every_run_with_controls_and_seed_counts(tmp_path):
    plans = parse_suite(SUITE, "t.toml").plan()
    assert len(plans) == 6
    rd = RunDirectory(tmp_path / "run", {"suite": "t"}, plans)
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert first["schema"] == 1
    assert [r["run"] for r in first["runs"]] == [p.run_id for p in plans]
    assert not any(r["finished"] for r in first["runs"])
    # Seed 0: control held, run diverged with a NaN loss; seed 1 both fine; seed 2 not run.
    rd.add(*_outcome(plans[0], final_loss=0.5, diverged=False, learned=True))
    rd.add(*_outcome(plans[1], final_loss=float("nan"), diverged=True, first_nonfinite_step=2))
    rd.add(*_outcome(plans[2], final_loss=0.4, diverged=False))
    rd.add(*_outcome(plans[3], final_loss=float("inf"), max_condition=float("inf")))
    text = (tmp_path / "run" / "summary.json").read_text()
    runs = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["runs"]
    assert all(list(r) == list(SUMMARY_FIELDS) for r in runs)
    fields = json.loads(text)["fields"]
    assert list(fields) == list(SUMMARY_FIELDS) and all(len(d) > 10 for d in fields.values())
    control, run = runs[0], runs[1]
    assert control["control_of"] == run["run"] and control["control"] is None
    assert run["control"]["run"] == control["run"] and run["control"]["final_loss"] == 0.5
    assert run["failure_cause"] == "precision" and control["failure_cause"] == "none"
    assert run["final_loss"] is None  # NaN written as null
    assert runs[3]["max_condition"] is None and runs[3]["failure_cause"] == "none"
    assert [r["seeds_broken"] for r in runs] == [0, 1, 0, 1, 0, 1]
    assert {r["seeds_total"] for r in runs} == {3}
    assert runs[5]["finished"] is False and runs[5]["failure_cause"] is None
    rd.close()
    summary, records = load_run(tmp_path / "run")
    assert len(summary) == 6 and len(records) == 12
    assert summary.loc[1, "control.run"] == control["run"]
    # The writer writes data only: the command that ran the suite writes the report.
    assert not (tmp_path / "run" / "report.html").exists()
    run_read = read_run(tmp_path / "run")
    assert [r["run"] for r in run_read.runs] == [p.run_id for p in plans]
    assert run_read.config == {"suite": "t"} and run_read.records_files == ("records.parquet",)
    assert run_read.records.equals(records)


def test_refuses_to_overwrite_a_run(tmp_path):
    plans = parse_suite(SUITE, "t.toml").choose(dtypes=[torch.float32]).plan()
    RunDirectory(tmp_path, {}, plans).close()
    with pytest.raises(UsageError, match="already holds a run"):
        RunDirectory(tmp_path, {}, plans)


def test_load_run_errors_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no summary.json"):
        load_run(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "summary.json").write_text('{"schema": 7, "runs": []}')
    with pytest.raises(ValueError, match="summary of schema 1"):
        load_run(tmp_path)
    (tmp_path / "summary.json").write_text('{"schema": 1, "runs": []}')
    with pytest.raises(ValueError, match="has no records.parquet"):
        load_run(tmp_path)
    (tmp_path / "records.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_run(tmp_path)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(ValueError, match="not a precision-lab records file"):
        load_run(tmp_path)


FRONTIER_SUITE = """
dtypes = ["bf16"]
steps = 3
[[frontier]]
models = ["mlp"]
knob = "damping"
ladder = [1e-2, 1e-4, 1e-6]
optimizers = ["kfac:cholesky"]
"""


def test_an_interrupted_frontier_keeps_entries_with_its_unrun_rungs_missing(tmp_path):
    """summary.json is rewritten after every run, frontiers included: a suite stopped after
    the first rung (control and run) says what it found there and what it did not run."""
    plans = parse_suite(FRONTIER_SUITE, "t.toml").plan()
    rd = RunDirectory(tmp_path / "run", {"suite": "t"}, plans)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["frontiers"][0][
        "verdict"
    ] == ("unknown (3 rungs missing)")  # nothing ran yet
    for plan in plans[:2]:
        rd.add(
            {"run": plan.run_id, **done(diverged=plan.dtype != torch.float32)}, frame_from_rows([])
        )
    rd.release()  # killed before close: no records merge, the lock goes with the process
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (entry,) = summary["frontiers"]
    assert entry["ladder"] == [1e-2, 1e-4, 1e-6]
    assert [r["status"] for r in entry["rungs"]] == ["broke", "missing", "missing"]
    assert [r["control_status"] for r in entry["rungs"]] == ["held", "missing", "missing"]
    assert entry["breaking_point"] == 1e-2 and entry["control_breaking_point"] is None
    assert entry["precision_cost"] is None  # the control's breaking point is unknown
    by_id = {run["run"]: run for run in summary["runs"]}
    assert by_id[entry["rungs"][0]["run"]]["frontier"] == "damping"
    assert by_id[entry["rungs"][0]["run"]]["knob_value"] == 1e-2
    assert read_run(tmp_path / "run").runs  # still a readable run directory
