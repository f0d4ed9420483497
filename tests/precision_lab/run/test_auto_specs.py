"""``+auto`` specs end to end: a real stress run names its runs with the suffix, builds
each optimizer with ``precision="auto"``, and its baseline and gate tell
``kfac:cholesky+auto`` from ``kfac:cholesky`` (issue 19)."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.gate.baseline import read_run_dir
from precision_lab.specs import OptimizerSpec

OPTIMIZERS = ("kfac:cholesky+auto", "singd:diagonal+auto")
# In-process runs share one process's resident-memory high-water mark (see
# tests/precision_lab/gate/test_quick_suite.py): peak memory is left out of the gate.
NO_PEAK = ("--peak-floor", "1024GiB")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_auto_specs_run_baseline_and_gate_under_their_own_names(tmp_path, monkeypatch):
    built: list[tuple[str, str | None]] = []
    build = OptimizerSpec.build

    def recording_build(self, model, overrides=None):
        optimizer = build(self, model, overrides)
        built.append((self.text, optimizer.precision))
        return optimizer

    monkeypatch.setattr(OptimizerSpec, "build", recording_build)
    out = tmp_path / "run"
    result = invoke(
        *("stress", "--suite", "quick", "--scenarios", "baseline", "--dtype", "bf16"),
        *("--optimizers", " KFAC:cholesky + auto,singd:diagonal+auto", "--steps", "6"),
        *("--out", str(out)),
    )
    assert result.exit_code == 0, result.output

    # Every optimizer the suite built (its check and its runs) was built with precision auto.
    assert {text for text, _ in built} == set(OPTIMIZERS)
    assert all(precision == "auto" for _, precision in built), built
    summary = json.loads((out / "summary.json").read_text())
    assert sorted({run["optimizer"] for run in summary["runs"]}) == sorted(OPTIMIZERS)
    assert all(run["finished"] for run in summary["runs"])
    assert all("+auto/" in run["run"] for run in summary["runs"])
    assert json.loads((out / "config.json").read_text())["optimizers"] == list(OPTIMIZERS)

    baseline = tmp_path / "baseline.json"
    result = invoke("baseline", str(out), "-o", str(baseline))
    assert result.exit_code == 0, result.output
    kept = {run["key"]["optimizer"] for run in json.loads(baseline.read_text())["runs"]}
    assert kept == set(OPTIMIZERS)
    result = invoke("gate", str(out), "--baseline", str(baseline), *NO_PEAK)
    assert result.exit_code == 0, result.output

    # The same figures under the plain name are other runs: the gate misses the +auto ones.
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    text = (plain / "summary.json").read_text().replace("kfac:cholesky+auto", "kfac:cholesky")
    (plain / "summary.json").write_text(text)
    assert {key.optimizer for key in read_run_dir(plain).runs} == {
        "kfac:cholesky",
        "singd:diagonal+auto",
    }
    result = invoke("gate", str(plain), "--baseline", str(baseline), *NO_PEAK)
    assert result.exit_code == 1
    assert "kfac:cholesky+auto" in result.output and "missing" in result.output


def test_auto_on_adamw_is_a_usage_error_of_the_command_line(tmp_path):
    result = invoke(
        *("stress", "--suite", "quick", "--optimizers", "kfac:cholesky,adamw+auto"),
        *("--out", str(tmp_path / "run")),
    )
    assert result.exit_code == 2
    assert "'adamw+auto' cannot take '+auto'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
