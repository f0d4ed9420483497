"""The gate: an identical run passes, each injected regression fails, naming run and figure."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.gate.baseline import read_baseline, read_run_dir
from precision_lab.gate.checks import (
    AbsoluteGrowth,
    AtLeast,
    AtMost,
    ConditionGrowth,
    NoneWhereNone,
    NotEarlier,
    Tolerances,
    condition_ceiling,
    gate,
)
from tests.precision_lab.gate.test_baseline import assert_one_sentence_error
from tests.precision_lab.gate_runs import CONFIG, MIB, base_runs, find, write_run_dir

MLP_SINGD = "mlp/baseline/singd:diagonal/bfloat16/pure/seed0"
MLP_KFAC = "mlp/baseline/kfac:cholesky/bfloat16/pure/seed0"
CNN_SINGD = "cnn/baseline/singd:diagonal/bfloat16/pure/seed0"
MLP_SINGD_CONTROL = "mlp/baseline/singd:diagonal/float32/pure/seed0 (control of bfloat16/pure)"


@pytest.fixture
def baseline_file(tmp_path):
    run_dir = write_run_dir(tmp_path / "base", base_runs())
    path = tmp_path / "baseline.json"
    result = CliRunner().invoke(cli, ["baseline", str(run_dir), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def gate_cli(tmp_path, baseline_file, edit: Callable[[list[dict]], Any] | None, *options: str):
    """Write the reference runs after ``edit`` as a new run directory and gate it."""
    runs = base_runs()
    if edit is not None:
        edit(runs)
    run_dir = write_run_dir(tmp_path / "new", runs)
    args = ["gate", str(run_dir), "--baseline", str(baseline_file), *options]
    return CliRunner().invoke(cli, args)


def set_figure(run_id: str, **figures: Any) -> Callable[[list[dict]], None]:
    def edit(runs: list[dict]) -> None:
        find(runs, run_id).update(figures)

    return edit


def test_identical_run_passes(tmp_path, baseline_file):
    result = gate_cli(tmp_path, baseline_file, None)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output
    assert "fail" not in result.output.split("gate passed")[1]
    data = json.loads(gate_cli(tmp_path, baseline_file, None, "--json").output)
    assert data["passed"] is True
    assert data["tolerances"] == {
        "memory": 0.0,
        "peak": 0.1,
        "peak_floor": 64 * MIB,
        "tensor_peak": 0.05,
        "condition_factor": 10.0,
        "nonfinite": 0.2,
        "underflow": 0.01,
        "loss": 0.05,
        "alpha": 0.01,
        "max_slowdown": None,
    }
    # Five runs, eleven checks each; six figures of the run that broke (r1) are chaos:
    # its NaN / Inf counts, condition, underflow, loss and accuracy are skipped.
    assert data["counts"] == {"fail": 0, "better": 0, "new": 0, "ok": 54, "skip": 6}


# Each regression the issue names, and the figure its message must name.
REGRESSIONS = [
    pytest.param(
        set_figure("r0", optimizer_state_bytes=int(123_456 * 1.1)),
        MLP_SINGD,
        "optimizer_state_bytes",
        id="10% more optimizer state",
    ),
    pytest.param(
        set_figure("r2", nan_events=1, first_nonfinite_step=30),
        CNN_SINGD,
        "nan_events",
        id="a new NaN",
    ),
    pytest.param(
        set_figure("r1", first_nonfinite_step=20),
        MLP_KFAC,
        "first_nonfinite_step",
        id="an earlier divergence",
    ),
    pytest.param(
        set_figure("r3", max_condition=1.5e5),
        MLP_SINGD_CONTROL,
        "max_condition",
        id="float32 condition number 100x larger",
    ),
    pytest.param(
        lambda runs: runs.remove(find(runs, "r2")),
        CNN_SINGD,
        "missing",
        id="a missing run",
    ),
    pytest.param(
        set_figure("r0", final_loss=0.42 * 1.2),
        MLP_SINGD,
        "final_loss",
        id="worse loss",
    ),
    pytest.param(
        set_figure("r3", final_loss=0.40 * 1.2),
        MLP_SINGD_CONTROL,
        "final_loss",
        id="worse loss of a float32 control",
    ),
    pytest.param(
        set_figure("r2", accuracy=0.80), CNN_SINGD, "accuracy", id="worse digits accuracy"
    ),
    pytest.param(set_figure("r0", diverged=True), MLP_SINGD, "diverged", id="a new divergence"),
    pytest.param(set_figure("r0", inf_events=2), MLP_SINGD, "inf_events", id="a new Inf"),
    pytest.param(
        set_figure("r0", peak_memory_bytes=310 * MIB * 1.1 + 64 * MIB + 1),
        MLP_SINGD,
        "peak_memory_bytes",
        id="peak memory beyond 10% + 64 MiB",
    ),
    pytest.param(
        set_figure("r0", peak_tensor_bytes=int(400_000 * 1.05) + 16 * 1024 + 1),
        MLP_SINGD,
        "peak_tensor_bytes",
        id="peak tensor memory beyond 5% + 16 KiB",
    ),
    pytest.param(
        set_figure("r0", underflow_fraction=0.002 + 0.0101),
        MLP_SINGD,
        "underflow_fraction",
        id="underflow fraction up by more than 0.01",
    ),
    pytest.param(
        set_figure("r0", final_loss=None), MLP_SINGD, "final_loss", id="loss turned non-finite"
    ),
    pytest.param(set_figure("r2", error="RuntimeError: boom"), CNN_SINGD, "error", id="a crash"),
    pytest.param(
        set_figure("r2", finished=False), CNN_SINGD, "did not finish", id="an unfinished run"
    ),
]


@pytest.mark.parametrize(("edit", "run", "figure"), REGRESSIONS)
def test_each_regression_fails_naming_run_and_figure(tmp_path, baseline_file, edit, run, figure):
    result = gate_cli(tmp_path, baseline_file, edit)
    assert result.exit_code == 1, result.output
    assert "gate failed" in result.output
    failures = json.loads(gate_cli(tmp_path, baseline_file, edit, "--json").output)["failures"]
    assert any(message.startswith(f"{run}: ") and figure in message for message in failures), (
        failures
    )
    # The summary at the end repeats every failure message in full.
    tail = result.output.split("gate failed")[1]
    for message in failures:
        assert message in tail


def test_failures_come_first_and_are_all_collected(tmp_path, baseline_file):
    def two_regressions(runs):
        find(runs, "r0")["optimizer_state_bytes"] += 1
        find(runs, "r3")["max_condition"] = 1e6

    data = json.loads(gate_cli(tmp_path, baseline_file, two_regressions, "--json").output)
    statuses = [check["status"] for check in data["checks"]]
    assert statuses[:2] == ["fail", "fail"]
    assert "fail" not in statuses[2:]
    assert {check["check"] for check in data["checks"][:2]} == {
        "memory.optimizer_state_bytes",
        "stability.max_condition",
    }


@pytest.mark.parametrize(
    ("edit", "options"),
    [
        pytest.param(
            set_figure("r0", optimizer_state_bytes=int(123_456 * 1.1)),
            ["--memory-tolerance", "10%"],
            id="state within an explicit tolerance",
        ),
        pytest.param(
            set_figure("r0", peak_memory_bytes=310 * MIB * 1.1 + 64 * MIB),
            [],
            id="peak exactly at tolerance + floor",
        ),
        pytest.param(
            set_figure("r0", peak_tensor_bytes=int(400_000 * 1.05) + 16 * 1024),
            [],
            id="peak tensor memory exactly at tolerance + floor",
        ),
        pytest.param(
            set_figure("r0", peak_tensor_bytes=int(400_000 * 1.2)),
            ["--tensor-tolerance", "20%"],
            id="peak tensor memory within an explicit tolerance",
        ),
        pytest.param(set_figure("r0", final_loss=0.42 * 1.04), [], id="loss within 5%"),
        pytest.param(
            set_figure("r1", first_nonfinite_step=33), [], id="first non-finite 17.5% earlier"
        ),
        pytest.param(set_figure("r3", max_condition=1.5e4), [], id="condition exactly 10x"),
        pytest.param(
            set_figure("r0", max_condition=1.5e6),
            [],
            id="a bfloat16 condition number beyond 1/eps = 128, saturated in both",
        ),
        pytest.param(
            set_figure("r1", nan_events=0, inf_events=3, max_condition=7.0, underflow_fraction=0.4),
            [],
            id="another pattern of NaN, Inf, condition and underflow after the same divergence",
        ),
        pytest.param(
            set_figure("r1", nan_events=30, final_loss=12.0),
            [],
            id="more NaN events and any loss after a baseline divergence",
        ),
        pytest.param(
            set_figure("r0", final_loss=0.42 * 1.2),
            ["--loss-tolerance", "0.25"],
            id="loss within a fractional tolerance",
        ),
    ],
)
def test_changes_within_tolerance_pass(tmp_path, baseline_file, edit, options):
    result = gate_cli(tmp_path, baseline_file, edit, *options)
    assert result.exit_code == 0, result.output


def test_improvements_are_reported_never_failures(tmp_path, baseline_file):
    def better(runs):
        find(runs, "r0").update(optimizer_state_bytes=1000, final_loss=0.2, accuracy=0.99)
        find(runs, "r1").update(first_nonfinite_step=None, diverged=False, nan_events=0)

    result = gate_cli(tmp_path, baseline_file, better, "--json")
    assert result.exit_code == 0, result.output
    improved = {
        (check["run"], check["check"])
        for check in json.loads(result.output)["checks"]
        if check["status"] == "better"
    }
    assert improved >= {
        (MLP_SINGD, "memory.optimizer_state_bytes"),
        (MLP_SINGD, "learning.final_loss"),
        (MLP_SINGD, "learning.accuracy"),
        (MLP_KFAC, "stability.diverged"),
    }


def test_a_run_without_baseline_is_new_not_a_failure(tmp_path, baseline_file):
    def add(runs):
        runs.append({**find(runs, "r2"), "run": "r9", "seed": 1})

    result = gate_cli(tmp_path, baseline_file, add, "--json")
    assert result.exit_code == 0, result.output
    new = [c for c in json.loads(result.output)["checks"] if c["status"] == "new"]
    assert [c["run"] for c in new] == ["cnn/baseline/singd:diagonal/bfloat16/pure/seed1"]


def test_json_agrees_with_the_table(tmp_path, baseline_file):
    edit = set_figure("r0", optimizer_state_bytes=200_000, max_condition=1e2)
    table = gate_cli(tmp_path, baseline_file, edit).output
    data = json.loads(gate_cli(tmp_path, baseline_file, edit, "--json").output)
    rows = [line for line in table.splitlines() if "│" in line or "|" in line]
    body = [line for line in rows if line.split("│")[1].strip() in {"fail", "ok", "better", "skip"}]
    assert len(body) == len(data["checks"])
    for line, check in zip(body, data["checks"], strict=True):
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        assert cells[:3] == [check["status"], check["check"], check["run"]]
        assert cells[5] == check["change"]
    state = next(
        c
        for c in data["checks"]
        if c["check"] == "memory.optimizer_state_bytes" and c["run"] == MLP_SINGD
    )
    assert (state["baseline"], state["current"], state["change"]) == (123_456, 200_000, "+62.0%")
    assert f"{data['counts']['fail']} fail" in table


def test_mismatched_suites_exit_2(tmp_path, baseline_file):
    runs = base_runs()
    config = {**json.loads((baseline_file.parent / "base" / "config.json").read_text())}
    config["suite"] = {"name": "default", "models": ["mlp"]}
    run_dir = write_run_dir(tmp_path / "other", runs, config)
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(baseline_file)])
    assert_one_sentence_error(result, "'default'", "'quick'")


def test_baseline_of_another_dtype_exits_2(tmp_path, baseline_file):
    def to_fp16(runs):
        for run in runs:
            if run["control_of"] is None:
                run["dtype"] = "float16"
        runs[:] = [run for run in runs if run["control_of"] is None]

    result = gate_cli(tmp_path, baseline_file, to_fp16)
    assert_one_sentence_error(result, "bfloat16", "float16", "baseline made for")


def test_other_suite_settings_exit_2(tmp_path, baseline_file):
    config = json.loads((baseline_file.parent / "base" / "config.json").read_text())
    run_dir = write_run_dir(tmp_path / "other", base_runs(), {**config, "steps": 10})
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(baseline_file)])
    assert_one_sentence_error(result, "steps = 10", "50")


def test_missing_baseline_exits_2(tmp_path):
    run_dir = write_run_dir(tmp_path / "new", base_runs())
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(missing)])
    assert_one_sentence_error(result, "nope.json", "does not exist")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--memory-tolerance", "-5%"),
        ("--peak-tolerance", "ten"),
        ("--condition-factor", "0.5"),
        ("--peak-floor", "64 parsecs"),
    ],
)
def test_bad_tolerances_exit_2_naming_the_value(tmp_path, baseline_file, option, value):
    result = gate_cli(tmp_path, baseline_file, None, option, value)
    assert result.exit_code == 2, result.output
    assert value in result.output and option in result.output
    assert "Traceback" not in result.output


def test_step_times_against_a_run_of_the_same_job(tmp_path, baseline_file):
    fast = write_run_dir(tmp_path / "fast", base_runs())

    def slower(runs):
        for run in runs:
            run["step_time_ms"] *= 2

    result = gate_cli(tmp_path, baseline_file, slower, "--against", str(fast), "--json")
    assert result.exit_code == 0, result.output
    timing = json.loads(result.output)["timing"]
    assert timing["geometric_mean_ratio"] == pytest.approx(2.0)
    assert timing["runs"] == 5 and timing["passed"] is True

    failed = gate_cli(
        tmp_path, baseline_file, slower, "--against", str(fast), "--max-slowdown", "1.5"
    )
    assert failed.exit_code == 1, failed.output
    assert "x2 that of" in failed.output

    held = gate_cli(
        tmp_path, baseline_file, slower, "--against", str(fast), "--max-slowdown", "2.5"
    )
    assert held.exit_code == 0, held.output


def test_against_another_suite_exits_2(tmp_path, baseline_file):
    other = write_run_dir(tmp_path / "other", base_runs(), {**CONFIG, "suite": "default"})
    result = gate_cli(tmp_path, baseline_file, None, "--against", str(other))
    assert_one_sentence_error(result, "--against", "'default'", "'quick'")


def test_max_slowdown_needs_against(tmp_path, baseline_file):
    result = gate_cli(tmp_path, baseline_file, None, "--max-slowdown", "1.5")
    assert_one_sentence_error(result, "--against")


def test_gate_library_call_matches_cli(tmp_path, baseline_file):
    current = read_run_dir(write_run_dir(tmp_path / "new", base_runs()))
    result = gate(current, read_baseline(baseline_file), Tolerances())
    assert result.passed and len(result.verdicts) == 60


# The checks themselves, at their boundaries: (check, current, baseline, fails?)
BOUNDARIES = [
    (AtMost("memory", "optimizer_state_bytes"), 100, 100, False),
    (AtMost("memory", "optimizer_state_bytes"), 101, 100, True),
    (AtMost("memory", "peak_memory_bytes", tolerance=0.1, floor=64), 174, 100, False),
    (AtMost("memory", "peak_memory_bytes", tolerance=0.1, floor=64), 175, 100, True),
    (AtMost("learning", "final_loss", tolerance=0.05), None, 1.0, True),
    (AtMost("learning", "final_loss", tolerance=0.05), -0.94, -1.0, True),
    (AtMost("learning", "final_loss", tolerance=0.05), -0.96, -1.0, False),
    (AtMost("learning", "final_loss", tolerance=0.05), 5.0, None, False),
    (AtLeast("learning", "accuracy", tolerance=0.05), 0.95, 1.0, False),
    (AtLeast("learning", "accuracy", tolerance=0.05), 0.94, 1.0, True),
    (NoneWhereNone("stability", "nan_events"), 1, 0, True),
    (NoneWhereNone("stability", "nan_events"), 9, 1, False),
    (NoneWhereNone("stability", "diverged"), True, False, True),
    (NoneWhereNone("stability", "diverged"), False, True, False),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), 8, 10, False),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), 7, 10, True),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), 7, None, True),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), None, 10, False),
    (ConditionGrowth("stability", "max_condition", factor=10), 1e4, 1e3, False),
    (ConditionGrowth("stability", "max_condition", factor=10), 1.01e4, 1e3, True),
    (ConditionGrowth("stability", "max_condition", factor=10), None, 1e3, True),
    (ConditionGrowth("stability", "max_condition", factor=10), 1e3, None, False),
    (ConditionGrowth("stability", "max_condition", factor=10), None, None, False),
    (AbsoluteGrowth("stability", "underflow_fraction", tolerance=0.01), 0.509, 0.5, False),
    (AbsoluteGrowth("stability", "underflow_fraction", tolerance=0.01), 0.52, 0.5, True),
]


def compared(check, current, baseline, dtype="float32", mode="pure", **hyperparameters):
    """What ``check`` compares for two runs with these figures (float32 factors by default)."""
    runs = [
        {check.figure: value, "dtype": dtype, "mode": mode, "hyperparameters": hyperparameters}
        for value in (current, baseline)
    ]
    return check.values(*runs)


@pytest.mark.parametrize(("check", "current", "baseline", "expected"), BOUNDARIES)
def test_check_boundaries(check, current, baseline, expected):
    message = check.fails(*compared(check, current, baseline))
    assert (message is not None) == expected, message
    if message is not None:
        assert check.figure in message


# Improvements, also at the edge of the (symmetric) tolerance band: (check, current, baseline).
IMPROVEMENTS = [
    (AtMost("memory", "optimizer_state_bytes"), 99, 100, True),
    (AtMost("memory", "peak_memory_bytes", tolerance=0.1, floor=64), 26, 100, False),
    (AtMost("memory", "peak_memory_bytes", tolerance=0.1, floor=64), 25, 100, True),
    (AtLeast("learning", "accuracy", tolerance=0.05), 1.04, 1.0, False),
    (AtLeast("learning", "accuracy", tolerance=0.05), 1.06, 1.0, True),
    (NoneWhereNone("stability", "nan_events"), 0, 3, True),
    (NoneWhereNone("stability", "nan_events"), 2, 3, False),
    (NoneWhereNone("stability", "diverged"), False, True, True),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), None, 10, True),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), 12, 10, False),
    (NotEarlier("stability", "first_nonfinite_step", tolerance=0.2), 13, 10, True),
    (ConditionGrowth("stability", "max_condition", factor=10), 1.1e2, 1e3, False),
    (ConditionGrowth("stability", "max_condition", factor=10), 0.9e2, 1e3, True),
    (AbsoluteGrowth("stability", "underflow_fraction", tolerance=0.01), 0.491, 0.5, False),
    (AbsoluteGrowth("stability", "underflow_fraction", tolerance=0.01), 0.48, 0.5, True),
]


@pytest.mark.parametrize(("check", "current", "baseline", "expected"), IMPROVEMENTS)
def test_improvement_boundaries(check, current, baseline, expected):
    values = compared(check, current, baseline)
    assert check.improves(*values) == expected
    assert check.fails(*values) is None


@pytest.mark.parametrize(("device", "code"), [("cpu", 0), ("cuda:0", 1)])
def test_peak_floor_follows_the_baselines_device(tmp_path, device, code):
    config = {**CONFIG, "device": device}
    base = write_run_dir(tmp_path / "base", base_runs(), config)
    path = tmp_path / "baseline.json"
    assert CliRunner().invoke(cli, ["baseline", str(base), "-o", str(path)]).exit_code == 0
    runs = base_runs()
    # 3 MiB above 110% of the baseline: within the CPU's 64 MiB, beyond CUDA's 2 MiB.
    find(runs, "r0")["peak_memory_bytes"] = 310 * MIB * 1.1 + 3 * MIB
    run_dir = write_run_dir(tmp_path / "new", runs, config)
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(path)])
    assert result.exit_code == code, result.output
    explicit = ["gate", str(run_dir), "--baseline", str(path), "--peak-floor", "4MiB"]
    assert CliRunner().invoke(cli, explicit).exit_code == 0


def test_environment_and_hyperparameter_changes_are_noted_not_failed(tmp_path, baseline_file):
    config = {**CONFIG, "versions": {**CONFIG["versions"], "torch": "2.99.0"}}
    runs = base_runs()
    find(runs, "r0")["hyperparameters"] = {"lr": 0.02, "damping": 1e-3}
    run_dir = write_run_dir(tmp_path / "new", runs, config)
    result = CliRunner().invoke(cli, ["gate", str(run_dir), "--baseline", str(baseline_file)])
    assert result.exit_code == 0, result.output
    assert "note: The baseline's versions differ" in result.output
    assert "2.99.0" in result.output
    assert (
        f"note: {MLP_SINGD} ran with other hyperparameters: damping None -> 0.001, lr 0.01 -> 0.02."
        in result.output
    )


@pytest.mark.parametrize(
    ("was", "now", "code"),
    [
        pytest.param(3.978e8, 4.237e9, 0, id="saturated in both: the issue's two machines"),
        pytest.param(3.978e8, None, 0, id="saturated, then non-finite"),
        pytest.param(1e6, 9e6, 0, id="crossing 1/eps within 10x"),
        pytest.param(1.5e3, 4.237e9, 1, id="from 1.5e3 to saturated"),
        pytest.param(1.5e3, None, 1, id="from 1.5e3 to non-finite"),
    ],
)
def test_float32_condition_numbers_saturate_at_1_over_eps(tmp_path, was, now, code):
    """KFAC's float32 factors (r4, the control of r1) at and beyond 1/eps = 8.4e6."""
    runs = base_runs()
    find(runs, "r4")["max_condition"] = was
    base = write_run_dir(tmp_path / "base", runs)
    path = tmp_path / "baseline.json"
    assert CliRunner().invoke(cli, ["baseline", str(base), "-o", str(path)]).exit_code == 0
    result = gate_cli(tmp_path, path, set_figure("r4", max_condition=now), "--json")
    assert result.exit_code == code, result.output
    verdict = next(
        c
        for c in json.loads(result.output)["checks"]
        if c["check"] == "stability.max_condition"
        and c["key"]["dtype"] == "float32"
        and c["key"]["optimizer"] == "kfac:cholesky"
    )
    assert verdict["status"] == ("ok" if code == 0 else "fail")
    if was > 8.4e6:
        assert verdict["change"] == "saturated"
    if code:
        assert "saturated: at or beyond 1/eps = 8.39e+06" in verdict["message"]


@pytest.mark.parametrize(
    ("run", "ceiling"),
    [
        ({"dtype": "float32", "mode": "pure"}, 2.0**23),
        ({"dtype": "bfloat16", "mode": "pure"}, 128),
        ({"dtype": "float16", "mode": "pure"}, 1024),
        ({"dtype": "bfloat16", "mode": "mixed"}, 2.0**23),
        (
            {
                "dtype": "bfloat16",
                "mode": "pure",
                "hyperparameters": {"factor_dtype": "torch.float32"},
            },
            2.0**23,
        ),
        (
            {
                "dtype": "float32",
                "mode": "mixed",
                "hyperparameters": {"preconditioner_dtype": [None, "torch.bfloat16"]},
            },
            128,
        ),
        (
            {"dtype": "float16", "mode": "pure", "hyperparameters": {"factor_dtype": None}},
            1024,
        ),
    ],
)
def test_the_condition_ceiling_follows_the_factors_dtype(run, ceiling):
    assert condition_ceiling(run) == ceiling


def test_a_baseline_made_before_peak_tensor_bytes_is_not_compared_on_it(tmp_path, baseline_file):
    """Baselines written before the figure existed stay readable: the check says why it
    was not made, and every other check still runs."""
    document = json.loads(baseline_file.read_text())
    for entry in document["runs"]:
        del entry["figures"]["peak_tensor_bytes"]
    old = tmp_path / "old-baseline.json"
    old.write_text(json.dumps(document))
    grown = set_figure("r0", peak_tensor_bytes=10 * 400_000)
    data = json.loads(gate_cli(tmp_path, old, grown, "--json").output)
    assert data["passed"], data["failures"]
    tensor = [c for c in data["checks"] if c["check"] == "memory.peak_tensor_bytes"]
    assert tensor and all(c["status"] == "skip" for c in tensor)
    assert "before this figure existed" in tensor[0]["message"]
    broken = set_figure("r0", optimizer_state_bytes=123_457)
    assert gate_cli(tmp_path, old, broken).exit_code == 1
