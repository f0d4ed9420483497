"""`learned`: did a run learn, and a failure charged to precision only when its control did."""

import json
import math

import pytest

from precision_lab.run.directory import RunDirectory
from precision_lab.run.suite import parse_suite
from precision_lab.run.summary import chance_accuracy, failure_cause, learned
from probes.records import frame_from_rows

DIGITS = {"classes": 10, "test_size": 360}
THRESHOLD = 0.1 + 3 * math.sqrt(0.1 * 0.9 / 360)  # 0.1474


def test_chance_accuracy_is_chance_plus_three_standard_errors():
    assert chance_accuracy(10, 360) == pytest.approx(THRESHOLD)
    assert chance_accuracy(2, 10_000) == pytest.approx(0.5 + 3 * 0.005)


@pytest.mark.parametrize(
    ("figures", "expected"),
    [
        # No labels' accuracy (synthetic data): the loss alone decides.
        ({"first_loss": 2.3, "final_loss": 0.4}, True),
        ({"first_loss": 2.3, "final_loss": 2.2}, False),  # fell by 4%: not 10%
        ({"first_loss": 2.3, "final_loss": 2.3 * 0.9}, True),  # exactly 10%
        ({"first_loss": 2.3, "final_loss": 2.5}, False),  # rose
        ({"first_loss": 2.3, "final_loss": math.nan}, False),
        ({"first_loss": 2.3, "final_loss": None}, False),
        # With a test accuracy: the loss fell and the accuracy beat chance.
        ({"first_loss": 2.3, "final_loss": 0.3, "accuracy": 0.9, **DIGITS}, True),
        ({"first_loss": 2.3, "final_loss": 0.3, "accuracy": 0.1, **DIGITS}, False),  # chance
        ({"first_loss": 2.3, "final_loss": 0.3, "accuracy": 0.086, **DIGITS}, False),
        ({"first_loss": 2.3, "final_loss": 0.3, "accuracy": 0.14, **DIGITS}, False),  # < 3 se
        ({"first_loss": 2.3, "final_loss": 0.3, "accuracy": 0.15, **DIGITS}, True),
        ({"first_loss": 2.3, "final_loss": 2.25, "accuracy": 0.9, **DIGITS}, False),  # flat
        # Diverged: did not learn; crashed, cut off or no first loss: unknown.
        (
            {"first_loss": 2.3, "final_loss": 30.0, "accuracy": 0.9, "diverged": True, **DIGITS},
            False,
        ),
        ({"first_loss": 2.3, "final_loss": 0.3, "finished": False}, None),
        ({"first_loss": None, "final_loss": None}, None),
    ],
)
def test_learned_on_hand_made_runs(figures, expected):
    assert learned(**figures) is expected


def test_an_accuracy_needs_its_classes_and_test_size():
    with pytest.raises(ValueError, match="classes"):
        learned(first_loss=2.3, final_loss=0.3, accuracy=0.9)


def _control(**figures):
    return {"finished": True, "diverged": False, "error": None, **figures}


def test_a_control_that_held_below_chance_is_no_learning_not_precision():
    """The default suite's mlp/near_fp16_max/kfac:cholesky/bfloat16: its float32 control held
    with test accuracy 0.086, below chance. The code before `learned` charged the
    bfloat16 divergence to precision."""
    control = _control(final_loss=0.5, accuracy=0.086)  # its loss fell; accuracy did not rise
    control["learned"] = learned(first_loss=2.3, final_loss=0.5, accuracy=0.086, **DIGITS)
    run = {"finished": True, "diverged": True, "error": None}
    assert control["learned"] is False
    assert failure_cause(run, control) == "no_learning"
    learned_control = _control(
        learned=learned(first_loss=2.3, final_loss=0.3, accuracy=0.9, **DIGITS)
    )
    assert failure_cause(run, learned_control) == "precision"


SUITE = """
models = ["mlp"]
scenarios = ["baseline", "input_scale=16384"]
optimizers = ["adamw", "sgd"]
dtypes = ["bf16"]
seeds = [0]
steps = 3
"""


def test_no_run_of_a_hand_made_summary_is_charged_to_precision_without_a_learned_control(
    tmp_path,
):
    """Every combination of control (held and learned / held, not learned / broke) and run
    (held / broke), written through a real `RunDirectory`."""
    plans = parse_suite(SUITE, "t.toml").plan()
    controls = [p for p in plans if p.coordinates["control_of"]]
    runs = [p for p in plans if not p.coordinates["control_of"]]
    assert len(controls) == len(runs) == 4
    control_outcomes = [
        {"diverged": False, "final_loss": 0.3, "accuracy": 0.9},
        {"diverged": False, "final_loss": 2.25, "accuracy": 0.9},  # loss flat
        {"diverged": False, "final_loss": 0.5, "accuracy": 0.086},  # below chance
        {"diverged": True, "final_loss": 40.0, "accuracy": 0.1},
    ]
    rd = RunDirectory(tmp_path / "run", {"suite": "t"}, plans)
    rows = frame_from_rows([])
    for plan, figures in zip(controls, control_outcomes, strict=True):
        verdict = learned(first_loss=2.3, finished=True, **figures, **DIGITS)
        rd.add({"run": plan.run_id, "finished": True, "learned": verdict, **figures}, rows)
    for plan in runs:
        rd.add({"run": plan.run_id, "finished": True, "diverged": True, "learned": False}, rows)
    rd.close()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]
    by_id = {r["run"]: r for r in summary}
    causes = [by_id[p.run_id]["failure_cause"] for p in runs]
    assert causes == ["precision", "no_learning", "no_learning", "optimization"]
    assert [by_id[p.run_id]["control"]["learned"] for p in runs] == [True, False, False, False]
    for run in summary:
        if run["failure_cause"] == "precision":
            assert run["control"]["learned"] is True
