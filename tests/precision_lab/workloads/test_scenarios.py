"""Scenarios do what their docstrings say: checked against the float16 arithmetic itself."""

import pytest
import torch
import torch.nn.functional as F

from precision_lab.workloads.models import NUM_CLASSES, NUM_FEATURES, build_model
from precision_lab.workloads.scenarios import FLOAT16_MAX, SCENARIOS, get_scenario

FP16_MIN_NORMAL = 2.0**-14


FAMILIES = ("singd", "kfac", "adamw", "sgd")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_trains_the_mlp_and_changes_something_from_the_baseline(name):
    """Batches the MLP takes (finite loss in float32), and a difference from the baseline:
    its data, its loss scale or an optimizer override."""
    scenario = SCENARIOS[name]
    assert scenario.name == name and scenario.description()
    data = scenario.dataset()
    x, y = next(data.batches(64, 0))
    assert x.shape == (64, NUM_FEATURES) and torch.isfinite(x).all()
    assert int(y.min()) >= 0 and int(y.max()) < NUM_CLASSES
    assert torch.isfinite(F.cross_entropy(build_model("mlp", 0)(x), y))
    baseline = get_scenario("baseline")
    changes = {
        "data": not torch.equal(data.train_x, baseline.dataset().train_x),
        "loss_scale": scenario.loss_scale != baseline.loss_scale,
        "overrides": any(scenario.overrides(family) for family in FAMILIES),
    }
    assert any(changes.values()) == (name != "baseline"), changes


def test_near_fp16_max_inputs_fit_but_their_second_moments_overflow():
    x = get_scenario("near_fp16_max").dataset().train_x
    assert float(x.abs().max()) == pytest.approx(FLOAT16_MAX / 4)
    half = x[:64].half()
    assert torch.isfinite(half).all()
    # KFAC's input factor A = a^T a / n, formed in float16, overflows to inf.
    assert torch.isinf(half.T @ half).any()
    assert torch.isfinite((x[:64].T @ x[:64]) / 64).all()


def test_gradient_underflow_puts_logit_gradients_in_the_fp16_subnormal_range():
    scenario = get_scenario("gradient_underflow")
    data = scenario.dataset()
    model = build_model("mlp", 0).half()
    logits = model(data.train_x[:64].half()).detach().requires_grad_()
    (F.cross_entropy(logits, data.train_y[:64]) * scenario.loss_scale).backward()
    g = logits.grad.abs()
    assert float(g.max()) < FP16_MIN_NORMAL  # every gradient is subnormal or zero
    assert float(g.max()) > 0
    # The same loss in float32: gradients are about 2**14 times larger, all normal.
    assert scenario.loss_scale == 2.0**-14


def test_ill_conditioned_uses_synthetic_data_spanning_four_decades():
    data = get_scenario("ill_conditioned").dataset()
    assert not data.real
    std = data.train_x.std(dim=0)
    assert float(std.max() / std.min()) > 0.9e4


@pytest.mark.parametrize(
    ("name", "family", "expected"),
    [
        ("baseline", "adamw", {}),
        ("tiny_damping", "singd", {"damping": 1e-8}),
        ("tiny_damping", "kfac", {"damping": 1e-8}),
        ("tiny_damping", "adamw", None),
        ("large_lr_cov", "singd", {"lr_cov": 0.5}),
        ("large_lr_cov", "kfac", None),
        ("large_lr_cov", "sgd", None),
    ],
)
def test_overrides_apply_only_to_families_with_the_hyperparameter(name, family, expected):
    assert get_scenario(name).overrides(family) == expected


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown scenario 'nope'; expected one of baseline"):
        get_scenario("nope")
