"""The examples a user copies run end to end, as the README's section "Stress your own
model" says: a workload file written outside the package, through the real command line
(a real process), to a summary with float32 controls, coverage and failure causes, a
report, and a baseline that the gate passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.run import runner
from precision_lab.run.suite import load_suite

ROOT = Path(__file__).resolve().parents[2]
PLAIN = "examples/tabular_classifier.py:build"
HUGGINGFACE = "examples/huggingface_gpt2.py:build"
MILD = ("baseline", "input_scale=16", "damping=0.001")


def _lab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "precision_lab", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_run_directory(out: Path) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert runs and {r["model"] for r in runs} == {"tabular"}
    assert all(r["finished"] and r["error"] is None for r in runs)
    low = [r for r in runs if r["dtype"] == "bfloat16"]
    controls = {r["run"]: r for r in runs if r["control_of"] is not None}
    assert low and len(controls) == len(low)
    for run in low:
        assert run["control"]["run"] in controls
        assert run["failure_cause"] in ("none", "precision", "no_learning", "optimization")
    for run in runs:
        assert run["metric_name"] == "held_out_accuracy"
        kronecker = run["optimizer"].startswith(("singd", "ikfac", "kfac", "ingd"))
        if kronecker:
            # The Linear layers are preconditioned, the store embedding is not.
            by_type = run["coverage"]["by_type"]
            assert by_type["Linear"]["fraction"] == 1.0
            assert by_type["Embedding"]["fallback_elements"] == 20 * 8
            assert 0.5 < run["preconditioned_fraction"] < 1.0
        else:
            assert run["coverage"] is None
    # Where nothing is pushed (the mildest rungs), the float32 controls learned the task:
    # held-out accuracy above chance (0.29); SINGD and AdamW far above it (KFAC at its
    # default lr 1e-3 learns more slowly). Harsher rungs may keep a control from learning:
    # a result (no_learning), not a failure of the example.
    mild = [c for c in controls.values() if c["scenario"] in MILD]
    assert mild and all(c["learned"] and c["accuracy"] > 0.29 for c in mild)
    assert all(c["accuracy"] > 0.6 for c in mild if c["optimizer"] in ("singd:diagonal", "adamw"))
    assert (out / "report.html").stat().st_size > 10_000
    return runs


@pytest.mark.slow
def test_the_plain_example_runs_the_default_suite_end_to_end_and_passes_its_gate(tmp_path):
    out = tmp_path / "run"
    stress = _lab("stress", "--models", PLAIN, "--dtype", "bf16", "--out", str(out))
    assert stress.returncode == 0, stress.stderr
    assert "tabular" in stress.stdout
    _check_run_directory(out)
    baseline = tmp_path / "baseline.json"
    made = _lab("baseline", str(out), "-o", str(baseline))
    assert made.returncode == 0, made.stderr
    gate = _lab("gate", str(out), "--baseline", str(baseline))
    assert gate.returncode == 0, gate.stdout + gate.stderr


def test_the_plain_example_trains_and_learns_in_bfloat16():
    """One SINGD run of the example as a suite plans it, in-process: seconds."""
    torch.set_num_threads(1)
    suite = load_suite("quick").choose(
        models=[PLAIN], optimizers=["singd:diagonal"], scenarios=["input_scale=16"]
    )
    run = next(p for p in suite.plan() if p.dtype == torch.bfloat16)
    summary = runner.train(run, device=torch.device("cpu"), every=10).summary
    assert summary["model"] == "tabular" and summary["metric_name"] == "held_out_accuracy"
    assert summary["learned"] and summary["accuracy"] > 0.6
    assert summary["coverage"]["by_type"]["Embedding"]["fallback_elements"] == 20 * 8


@pytest.mark.slow
def test_the_plain_example_runs_the_quick_suite(tmp_path):
    """The quick suite's input_scale frontier, SINGD only: 3 rungs, each beside its control."""
    out = tmp_path / "run"
    args = ["stress", "--suite", "quick", "--models", PLAIN, "--dtype", "bf16"]
    options = ["--optimizers", "singd:diagonal", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, *options])
    assert result.exit_code == 0, result.output
    runs = _check_run_directory(out)
    assert len(runs) == 6
    entry = json.loads((out / "summary.json").read_text())["frontiers"][0]
    assert entry["model"] == "tabular" and entry["knob"] == "input_scale"


def test_the_huggingface_example_runs_or_says_what_to_install(tmp_path):
    out = tmp_path / "run"
    args = ["stress", "--suite", "quick", "--models", HUGGINGFACE, "--dtype", "bf16"]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--out", str(out)])
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert result.exit_code == 2
        assert "needs HuggingFace transformers, not installed here: pip install transformers" in (
            result.output
        )
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "summary.json").read_text())["runs"]
    singd = next(r for r in runs if r["optimizer"] == "singd:diagonal")
    assert singd["coverage"]["by_type"]["Conv1D"]["fraction"] == 1.0
