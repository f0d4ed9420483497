"""``precision-lab stress`` end to end: the quick suite, divergence, Ctrl-C, torchrun."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from precision_lab import load_run
from precision_lab.cli import cli
from precision_lab.run.summary import SUMMARY_FIELDS
from precision_lab.workloads.builtin import digits_workload
from precision_lab.workloads.data import digits
from precision_lab.workloads.loader import _LOADED

TYPES = {
    "run": str,
    "model": str,
    "scenario": str,
    "optimizer": str,
    "dtype": str,
    "mode": str,
    "seed": int,
    "steps": int,
    "finished": bool,
    "diverged": bool,
    "nan_events": int,
    "inf_events": int,
    "skipped_steps": int,
    "overflow_events": int,
    "optimizer_state_bytes": int,
    "peak_memory_bytes": int,
    "step_time_ms": float,
    "failure_cause": str,
    "seeds_broken": int,
    "seeds_total": int,
    "warnings": list,
    "hyperparameters": dict,
}
NULLABLE = {
    "frontier": str,
    "knob_value": float,
    "structure": str,
    "control_of": str,
    "first_nonfinite_step": int,
    "underflow_fraction": float,
    "max_condition": float,
    "final_loss": float,
    "accuracy": float,
    "learned": bool,
    "fallback_optimizer": str,
    "preconditioned_fraction": float,
    "coverage": dict,
    "control": dict,
    "error": str,
}


def stress(*args, env=None):
    return CliRunner().invoke(cli, ["stress", *args], catch_exceptions=False, env=env)


def test_quick_suite_writes_a_valid_run_directory(quick_run):
    out = quick_run
    output = out.with_name("output.txt").read_text()
    assert f"Run directory: {out}" in output
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "summary.json",
        "records.parquet",
        "report.html",
        "failures",
    }
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert len(runs) == 18  # 3 rungs x 3 optimizers x (control + run)
    for run in runs:
        assert list(run) == list(SUMMARY_FIELDS)
        for field, kind in TYPES.items():
            assert isinstance(run[field], kind), (field, run[field])
        for field, kind in NULLABLE.items():
            assert run[field] is None or isinstance(run[field], kind), (field, run[field])
        assert run["finished"] and run["error"] is None
        assert run["dtype"] in ("float32", "bfloat16")
        assert (run["control_of"] is None) == (run["dtype"] == "bfloat16")
        assert (run["control"] is None) == (run["dtype"] == "float32")
        assert isinstance(run["accuracy"], float)  # digits: real data, always measured
    config = json.loads((out / "config.json").read_text())
    for key in ("suite", "optimizers", "dtypes", "modes", "seeds", "versions", "device", "command"):
        assert key in config
    assert config["dtypes"] == ["bfloat16"] and config["device"] == "cpu"
    assert (
        config["command"]
        == f"precision-lab stress --dtype bf16 --suite quick --device cpu --out {out}"
    )


def test_quick_suite_records_load_back(quick_run):
    out = quick_run
    summary, records = load_run(out)
    assert len(summary) == 18
    assert set(records["run"]) == set(summary["run"])
    loss = records.query("probe == 'train' and metric == 'loss'")
    finished = summary[~summary["diverged"]]
    for run_id in finished["run"]:
        assert loss[loss["run"] == run_id]["step"].tolist() == list(range(30))  # quick: 30
    accuracy = records.query("metric == 'test_accuracy'")
    assert set(accuracy["run"]) == set(summary["run"])  # digits: every run has one
    assert {"numerics", "memory", "time", "condition", "train"} <= set(records["probe"])
    # whatif rows name the dtypes they consider (float16, float8_*): not the run's.
    own = records[records["probe"] != "whatif"]
    assert (own["dtype"].isin(["float32", "bfloat16", ""])).all()


def test_kronecker_runs_of_the_mlp_precondition_every_parameter(quick_run):
    """The real quick suite: the MLP is all nn.Linear, so every SINGD and KFAC run (and
    control) records a preconditioned fraction of exactly 1 with its coverage by layer
    type, AdamW and SGD runs none; the terminal table shows it."""
    runs = json.loads((quick_run / "summary.json").read_text())["runs"]
    mlp = [run for run in runs if run["model"] == "mlp"]
    kronecker = [run for run in mlp if run["optimizer"].split(":")[0] in ("singd", "kfac")]
    first_order = [run for run in mlp if run not in kronecker]
    assert kronecker and first_order
    for run in kronecker:
        assert run["preconditioned_fraction"] == 1.0, run["run"]
        assert list(run["coverage"]["by_type"]) == ["Linear"], run["run"]
        total = run["coverage"]["total"]
        assert total["fallback_elements"] == total["untrained_elements"] == 0
        assert total["preconditioned_elements"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
        assert run["coverage"]["final"] is True
    for run in first_order:
        assert run["preconditioned_fraction"] is None and run["coverage"] is None, run["run"]
    output = quick_run.with_name("output.txt").read_text()
    assert "precond" in output and "100%" in output


def test_no_run_is_charged_to_precision_unless_its_control_learned(quick_run):
    """The real quick suite: every run that finished says whether it learned, and a run
    charged to precision has a float32 control that held and learned."""
    runs = json.loads((quick_run / "summary.json").read_text())["runs"]
    assert all(isinstance(run["learned"], bool) for run in runs if run["finished"])
    by_id = {run["run"]: run for run in runs}
    for run in runs:
        control = by_id.get(run["control"]["run"]) if run["control"] else None
        if run["failure_cause"] == "precision":
            assert control is not None and control["learned"] is True, run["run"]
            assert run["control"]["learned"] is True
        if run["failure_cause"] == "no_learning":
            assert control is not None and control["learned"] is False, run["run"]


def test_the_table_names_every_run(quick_run):
    output = quick_run.with_name("output.txt").read_text()
    for name in ("singd:diagonal", "kfac:cholesky", "adamw", "input_scale=16384", "float32 ctl"):
        assert name in output


def test_frontiers_in_summary_json_are_the_breaking_points_of_its_runs(quick_run):
    """The real quick suite: each entry of summary.json's frontiers, recomputed by hand
    from the run objects it names (the mildest rung whose run diverged or raised; the
    cost as the distance between the float32 control's and the run's), is what was
    written; the terminal prints the frontier table before the run table."""
    summary = json.loads((quick_run / "summary.json").read_text())
    by_id = {run["run"]: run for run in summary["runs"]}
    entries = summary["frontiers"]
    assert {(e["knob"], e["optimizer"], e["dtype"]) for e in entries} == {
        ("input_scale", o, "bfloat16") for o in ("singd:diagonal", "kfac:cholesky", "adamw")
    }

    def first_broken(ids):
        broken = [i for i, run in enumerate(ids) if by_id[run]["diverged"] or by_id[run]["error"]]
        return broken[0] if broken else None

    for entry in entries:
        assert entry["ladder"] == [16.0, 256.0, 16384.0]
        runs = [rung["run"] for rung in entry["rungs"]]
        controls = [rung["control"] for rung in entry["rungs"]]
        assert [by_id[r]["knob_value"] for r in runs + controls] == entry["ladder"] * 2
        assert all(by_id[c]["control_of"] == r for r, c in zip(runs, controls, strict=True))
        mine, theirs = first_broken(runs), first_broken(controls)
        assert entry["breaking_point"] == (None if mine is None else entry["ladder"][mine])
        assert entry["control_breaking_point"] == (
            None if theirs is None else entry["ladder"][theirs]
        )
        assert entry["precision_cost"] == (3 if theirs is None else theirs) - (
            3 if mine is None else mine
        )
    output = quick_run.with_name("output.txt").read_text()
    assert output.index("frontier") < output.index("precision-lab stress")
    config = json.loads((quick_run / "config.json").read_text())
    assert config["frontiers"] == [
        {
            "models": ["mlp"],
            "knob": "input_scale",
            "ladder": [16.0, 256.0, 16384.0],
            "optimizers": ["singd:diagonal", "kfac:cholesky", "adamw"],
        }
    ]


def test_default_out_is_a_timestamped_folder_under_reports_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("--suite", "quick", "--scenarios", "baseline", "--optimizers", "adamw")
    result = stress(*args, "--dtype", "fp32", "--steps", "1")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "reports" / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}", run.name)
    assert f"Run directory: {run.relative_to(tmp_path)}" in result.output
    assert len(load_run(run)[0]) == 1  # float32 only: no control


def _diverging_suite(tmp_path, dtypes='dtypes = ["float32"]'):
    path = tmp_path / "diverge.toml"
    path.write_text(
        'models = ["mlp"]\nscenarios = ["baseline"]\noptimizers = ["sgd", "adamw"]\n'
        f"{dtypes}\nsteps = 8\n[hyperparameters.sgd]\nlr = 1e4\n"
    )
    return path


def test_a_divergence_is_recorded_and_the_suite_goes_on(tmp_path):
    """SGD at lr 1e4: its float16 forward overflows at step 1 (a NaN loss); AdamW after it
    runs to the end."""
    out = tmp_path / "run"
    suite = _diverging_suite(tmp_path, 'dtypes = ["float16"]\nmodes = ["mixed"]')
    result = stress("--suite", str(suite), "--out", str(out))
    assert result.exit_code == 0, result.output
    summary, _ = load_run(out)
    runs = summary.set_index("run")
    sgd = runs.loc["mlp/baseline/sgd/float16/mixed/s0"]
    assert sgd["diverged"] and sgd["steps"] < 8 and sgd["first_nonfinite_step"] == 1
    assert sgd["failure_cause"] == "optimization"  # its float32 control diverged as well
    assert runs.loc["mlp/baseline/sgd/float32/pure/s0/control-float16-mixed", "diverged"]
    adamw = runs.loc["mlp/baseline/adamw/float16/mixed/s0"]
    assert adamw["finished"] and not adamw["diverged"] and adamw["steps"] == 8


def test_ctrl_c_mid_suite_keeps_earlier_runs_and_exits_130(tmp_path, monkeypatch):
    """KeyboardInterrupt raised inside the third run, via the workload's batches."""
    calls = []

    class Interrupting:
        def __getattr__(self, name):
            return getattr(digits(), name)

        def batches(self, batch_size, seed):
            calls.append(1)
            for i, batch in enumerate(digits().batches(batch_size, seed)):
                # The first call is the suite's check of the workload, before any run.
                if len(calls) == 4 and i == 2:
                    raise KeyboardInterrupt
                yield batch

    monkeypatch.setitem(_LOADED, ("mlp", 64), digits_workload("mlp", 64, Interrupting()))
    out = tmp_path / "run"
    result = stress(
        "--suite", "quick", "--scenarios", "baseline", "--steps", "4", "--out", str(out)
    )
    assert result.exit_code == 130
    assert "Interrupted" in result.output
    summary, records = load_run(out)
    assert summary["finished"].tolist() == [True, True, False, False, False, False]
    assert summary["steps"].tolist() == [4, 4, 2, 0, 0, 0]
    assert set(records["run"]) == set(summary["run"][:3])
    assert (out / "report.html").exists()


def test_seeds_are_counted_per_configuration(tmp_path):
    out = tmp_path / "run"
    result = stress(
        *("--suite", str(_diverging_suite(tmp_path)), "--seeds", "0,1,2", "--out", str(out))
    )
    assert result.exit_code == 0, result.output
    assert "seeds broken" in result.output
    summary, _ = load_run(out)
    assert (summary["seeds_total"] == 3).all()
    sgd = summary[summary["optimizer"] == "sgd"]
    assert (sgd["seeds_broken"] == sgd["diverged"].sum()).all() and sgd["diverged"].all()
    assert (summary[summary["optimizer"] == "adamw"]["seeds_broken"] == 0).all()
    assert " 3/3 " in result.output and " 0/3 " in result.output


def test_kfac_failures_land_in_the_runs_own_folder(tmp_path):
    """input_scale=16384 in float16: KFAC's A overflows, its inversion fails, a reproducer is
    saved under failures/<run id>/."""
    out = tmp_path / "run"
    args = ("--dtype", "fp16", "--suite", "quick", "--scenarios", "input_scale=16384")
    result = stress(*args, "--optimizers", "kfac:cholesky", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    run = out / "failures" / "mlp" / "input_scale=16384" / "kfac:cholesky" / "float16" / "pure"
    run = run / "s0"
    files = list(run.iterdir())
    assert files and all(p.suffix == ".pt" for p in files)


@pytest.mark.slow
def test_sigint_to_a_real_process_saves_and_exits_130(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the process, once a run is recorded."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "precision_lab", "stress", "--suite", "quick"]
    command += ["--dtype", "bf16", "--steps", "400", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 90
    summary = out / "summary.json"
    while time.monotonic() < deadline:
        if summary.exists() and '"finished": true' in summary.read_text():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    runs, records = load_run(out)
    assert runs["finished"].iloc[0] and not runs["finished"].iloc[-1]
    assert set(records["run"]) <= set(runs["run"]) and len(records)


INJECTED_FAILURE = """
import os
if os.environ.get("RANK") == "1":
    import torch.nn.functional as F
    real, calls = F.cross_entropy, [0]
    def cross_entropy(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # the second run's second step
            raise RuntimeError("injected failure on rank 1")
        return real(*args, **kwargs)
    F.cross_entropy = cross_entropy
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_a_run_failing_on_one_torchrun_rank_stops_the_suite_instead_of_hanging(tmp_path):
    """Rank 1 raises inside a run (a sitecustomize module patches its loss function, in
    a real torchrun job): both ranks exit 1 within seconds, each with one sentence, and
    rank 0 still closes a readable run directory with the finished run in it."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECTED_FAILURE)
    out = tmp_path / "run"
    command = [
        *("torchrun", "--nproc-per-node", "2", "-m", "precision_lab", "stress"),
        *("--dtype", "bf16", "--suite", "quick", "--scenarios", "baseline"),
        *("--optimizers", "singd:diagonal,adamw", "--steps", "3", "--out", str(out)),
    ]
    path = os.pathsep.join([str(tmp_path / "inject"), *sys.path])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # Its own session, so that a hang (the bug this guards against) kills every rank too.
    job = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail("the torchrun job hung after a run failed on rank 1")
    done = subprocess.CompletedProcess(command, job.returncode, stdout, stderr)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: rank")]
    assert any(
        line.startswith("Error: rank 1 of 2: run ") and "injected failure on rank 1" in line
        for line in errors
    ), done.stderr[-3000:]
    # Rank 0 only saw its collective break; it names rank 1's error as the cause.
    assert any(
        line.startswith("Error: rank 0 of 2: run ")
        and "(rank 1: RuntimeError: injected failure on rank 1; then rank 0: " in line
        for line in errors
    ), errors
    summary, records = load_run(out)
    assert summary["finished"].iloc[0] and pd.isna(summary["error"].iloc[0])
    assert (
        summary["error"]
        .iloc[1]
        .startswith("rank 1: RuntimeError: injected failure on rank 1; then rank 0: ")
    ), summary["error"].iloc[1]
    assert set(records["run"]) >= {summary["run"].iloc[0]}
    assert (out / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_cpu_ranks_write_one_run_directory(tmp_path):
    out = tmp_path / "run"
    command = [
        *("torchrun", "--nproc-per-node", "2", "-m", "precision_lab", "stress"),
        *("--dtype", "bf16", "--suite", "quick", "--scenarios", "baseline"),
        *("--optimizers", "singd:diagonal,adamw", "--steps", "3", "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("Run directory:") == 1  # rank 0 alone reports
    summary, records = load_run(out)
    assert len(summary) == 4 and summary["finished"].all()
    assert sorted(records["rank"].unique()) == [0, 1]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    # Both ranks saw the same (all-reduced) loss, so they stopped at the same step.
    loss = records.query("metric == 'loss'")
    per_rank = loss.pivot_table(index=["run", "step"], columns="rank", values="value")
    pd.testing.assert_series_equal(per_rank[0], per_rank[1], check_names=False)
