"""The runner applies a plan's condition, and loss_scale's learning-rate rule holds in
real training: SGD, SINGD and KFAC steps shrink with the loss scale (so the suite divides
their learning rate by it), AdamW's do not (precision_lab/workloads/knobs.py)."""

from __future__ import annotations

import pytest
import torch

from precision_lab.run import runner
from precision_lab.run.suite import parse_suite

CPU = torch.device("cpu")
SCALES = [1.0, 2.0**-4, 2.0**-8]
SUITE = f"""
dtypes = ["float32"]
steps = 15
[[frontier]]
models = ["mlp"]
knob = "loss_scale"
ladder = {SCALES}
optimizers = ["sgd", "singd:diagonal", "kfac:cholesky", "adamw"]
[hyperparameters.singd]
lr = 0.03
[hyperparameters.adamw]
lr = 0.01
"""


@pytest.fixture(scope="module")
def losses():
    """Final training loss per (optimizer, loss scale, learning rate divided)."""
    out = {}
    for plan in parse_suite(SUITE, "t.toml").plan():
        for divided in (True, False):
            if not divided:
                lr = {"singd": 0.03, "adamw": 0.01}.get(plan.family)
                hyper = {k: v for k, v in plan.hyperparameters.items() if k != "lr"}
                plan = type(plan)(**{**plan.__dict__, "hyperparameters": {**hyper, "lr": lr}})
                if lr is None:
                    plan.hyperparameters.pop("lr")
            summary = runner.train(plan, device=CPU, every=15).summary
            out[plan.optimizer, plan.knob_value, divided] = summary["final_loss"]
    return out


def test_sgd_with_its_learning_rate_divided_takes_the_same_steps(losses):
    """Powers of two: the same steps bit for bit, whatever the scale."""
    assert {losses["sgd", s, True] for s in SCALES} == {losses["sgd", 1.0, True]}
    assert losses["sgd", 2.0**-8, False] > 0.95 * losses["sgd", 2.0**-8, True] > 0


@pytest.mark.parametrize("optimizer", ["singd:diagonal", "kfac:cholesky"])
def test_kronecker_steps_follow_the_loss_scale_once_damping_dominates(losses, optimizer):
    """Below 2**-4 the gradient factor (~ s**2) is far below the damping: dividing the
    learning rate by s gives the same training at every smaller scale, and without the
    division the run stays at its untrained loss."""
    low, lower = losses[optimizer, 2.0**-4, True], losses[optimizer, 2.0**-8, True]
    assert lower == pytest.approx(low, rel=0.02)  # KFAC: 0.987 against 0.996 at 15 steps
    assert lower < losses[optimizer, 2.0**-8, False] - 0.15  # ~2.32: ln 10, untrained


def test_adamw_needs_no_division(losses):
    assert losses["adamw", 2.0**-8, False] == pytest.approx(losses["adamw", 1.0, False], rel=0.05)


def test_input_scale_reaches_the_model_scaled_to_its_maximum():
    """The condition scales the training inputs so that max |x| is the rung's value: the
    first layer's inputs, watched by the probes in float32, reach it."""
    suite = parse_suite(
        SUITE.replace('"loss_scale"', '"input_scale"').replace(str(SCALES), "[1000.0]"), "t.toml"
    )
    plan = next(p for p in suite.plan() if p.optimizer == "adamw")
    data = runner.digits()
    factor = plan.condition.input_factor(float(data.train_x.abs().max()))
    assert float(plan.condition.scale_inputs(data.train_x, factor).abs().max()) == pytest.approx(
        1000.0
    )
    assert plan.condition.loss_multiplier == 1.0 and plan.hyperparameters == {"lr": 0.01}
