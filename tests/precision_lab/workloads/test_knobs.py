"""Knobs make conditions that do what the module says: inputs scaled to a maximum, loss
multiplied with the learning rate divided where the step follows the gradient's scale,
hyperparameters set only where the family has them."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from precision_lab.workloads.knobs import KNOBS, Condition, get_knob


def test_input_scale_multiplies_floating_tensors_only_in_any_nesting():
    condition = KNOBS["input_scale"].condition(100.0)
    factor = condition.input_factor(4.0)
    assert factor == 25.0
    x, ids = torch.tensor([[1.0, -4.0]]), torch.tensor([3, 4])
    batch = {"x": x, "pair": (x.double(), ids), "list": [ids, "text"]}
    out = condition.scale_inputs(batch, factor)
    assert torch.equal(out["x"], torch.tensor([[25.0, -100.0]]))
    assert out["pair"][0].dtype == torch.float64 and float(out["pair"][0].abs().max()) == 100.0
    assert out["pair"][1] is ids and out["list"] == [ids, "text"]
    assert isinstance(out["pair"], tuple)
    with pytest.raises(ValueError, match="max"):
        condition.input_factor(0.0)


def test_input_scale_keeps_named_tuples():
    """A workload's inputs as a named tuple stay one (the old walk rebuilt a tuple from a
    generator, which a named tuple's constructor does not take)."""
    Pair = namedtuple("Pair", ["x", "ids"])
    out = Condition.scale_inputs(Pair(torch.tensor([2.0]), torch.tensor([7])), 3.0)
    assert isinstance(out, Pair)
    assert torch.equal(out.x, torch.tensor([6.0])) and torch.equal(out.ids, torch.tensor([7]))


@pytest.mark.parametrize(
    ("knob", "family", "expected"),
    [
        ("damping", "singd", {"damping": 1e-6}),
        ("damping", "kfac", {"damping": 1e-6}),
        ("damping", "adamw", None),
        ("damping", "sgd", None),
        ("lr_cov", "singd", {"lr_cov": 1e-6}),
        ("lr_cov", "kfac", None),
        ("input_scale", "adamw", {}),
        ("loss_scale", "kfac", {}),
    ],
)
def test_overrides_apply_only_to_families_with_the_hyperparameter(knob, family, expected):
    condition = KNOBS[knob].condition(1e-6)
    assert condition.overrides(family) == expected
    reason = condition.skip_reason(family)
    assert (reason is None) == (expected is not None)
    if reason:
        assert reason.startswith(f"{knob}=1e-06 does not apply to {family}: ")


def test_loss_scale_divides_the_learning_rate_of_scale_dependent_families_only():
    condition = KNOBS["loss_scale"].condition(2.0**-8)
    assert condition.loss_multiplier == 2.0**-8
    assert condition.lr_multiplier == {"singd": 256.0, "kfac": 256.0, "sgd": 256.0}


@pytest.mark.parametrize(
    ("knob", "values", "mildest_first"),
    [
        ("damping", [1e-8, 1e-1, 1e-3], [1e-1, 1e-3, 1e-8]),
        ("input_scale", [16384, 1, 256], [1, 256, 16384]),
        ("loss_scale", [2.0**-14, 1.0], [1.0, 2.0**-14]),
        ("lr_cov", [0.5, 0.01], [0.01, 0.5]),
    ],
)
def test_ladders_order_from_mild_to_harsh(knob, values, mildest_first):
    assert get_knob(knob).mildest_first(values) == mildest_first


@pytest.mark.parametrize("value", [0, -1e-3, float("inf"), float("nan"), True, "1e-3"])
def test_knob_values_must_be_positive_finite_numbers(value):
    with pytest.raises(ValueError, match="damping must be a"):
        get_knob("damping").condition(value)


def test_unknown_knob_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown knob 'x'; expected one of damping, input_scale"):
        get_knob("x")


def test_baseline_condition_is_the_default():
    assert Condition() == Condition(name="baseline") and Condition().input_factor(3.0) == 1.0
