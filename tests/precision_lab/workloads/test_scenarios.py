"""Scenarios name conditions: baseline, a rung ``<knob>=<value>``, and the former
single-point scenarios, which now meet an error naming the rung that replaces them."""

import pytest
import torch
import torch.nn.functional as F

from precision_lab.workloads.data import digits
from precision_lab.workloads.knobs import FLOAT16_MAX, KNOBS
from precision_lab.workloads.models import build_model
from precision_lab.workloads.scenarios import RETIRED, get_scenario, rung

FP16_MIN_NORMAL = 2.0**-14


def test_baseline_changes_nothing():
    condition = get_scenario("baseline")
    assert condition.name == "baseline" and rung("baseline") is None
    assert condition.loss_multiplier == 1.0 and condition.input_factor(37.0) == 1.0
    assert all(condition.overrides(f) == {} for f in ("singd", "kfac", "adamw", "sgd"))


@pytest.mark.parametrize(
    ("name", "knob", "value"),
    [
        ("damping=1e-08", "damping", 1e-8),
        ("input_scale=16384", "input_scale", 16384.0),
        ("loss_scale=0.25", "loss_scale", 0.25),
        ("lr_cov=0.5", "lr_cov", 0.5),
    ],
)
def test_a_rung_name_is_the_knobs_condition(name, knob, value):
    condition = get_scenario(name)
    assert condition == KNOBS[knob].condition(value)
    assert condition.name == name == KNOBS[knob].label(value)
    assert rung(name) == (knob, value)


@pytest.mark.parametrize("old", list(RETIRED))
def test_former_scenarios_name_the_rung_that_replaces_them(old):
    with pytest.raises(ValueError, match=r"is now the rung .* frontier") as err:
        get_scenario(old)
    replacement = RETIRED[old]
    assert replacement in str(err.value)
    assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)
    get_scenario(replacement)  # the rung itself is a valid scenario


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", "Unknown scenario 'nope'; expected baseline or a rung"),
        ("damping", "or a knob's name to select its frontiers"),
        ("ill_conditioned", "it changed the dataset"),
        ("warmth=3", "Unknown knob 'warmth'"),
        ("damping=abc", "has no number after '='"),
        ("damping=-1", "must be a positive finite number"),
    ],
)
def test_bad_scenario_names_get_one_sentence(name, message):
    with pytest.raises(ValueError, match=message):
        get_scenario(name)


def test_input_scale_16384_inputs_fit_float16_but_their_second_moments_overflow():
    """The former near_fp16_max (2**14, about a quarter of float16's maximum)."""
    condition = get_scenario("input_scale=16384")
    x = digits().train_x
    scaled = condition.scale_inputs(x, condition.input_factor(float(x.abs().max())))
    assert float(scaled.abs().max()) == 16384.0 < FLOAT16_MAX / 2
    half = scaled[:64].half()
    assert torch.isfinite(half).all()
    # KFAC's input factor A = a^T a / n, formed in float16, overflows to inf.
    assert torch.isinf(half.T @ half).any()
    assert torch.isfinite((scaled[:64].T @ scaled[:64]) / 64).all()


def test_loss_scale_2_pow_minus_14_puts_logit_gradients_in_the_fp16_subnormal_range():
    """The former gradient_underflow rung."""
    condition = get_scenario(RETIRED["gradient_underflow"])
    assert condition.loss_multiplier == pytest.approx(2.0**-14, rel=1e-5)
    data = digits()
    model = build_model("mlp", 0).half()
    logits = model(data.train_x[:64].half()).detach().requires_grad_()
    (F.cross_entropy(logits, data.train_y[:64]) * condition.loss_multiplier).backward()
    g = logits.grad.abs()
    assert float(g.max()) < FP16_MIN_NORMAL  # every gradient is subnormal or zero
    assert float(g.max()) > 0
