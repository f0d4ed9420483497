"""load_state_dict refuses, in one sentence and before changing anything, a checkpoint that
does not fit: another model, the other optimizer, another structure or dtype, no
checkpoint at all. SINGD and KFAC alike."""

import copy

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD


def mlp(width=8, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def trained(optimizer_class, model, steps=2, **kwargs):
    """An optimizer after ``steps`` steps (T=1: every factor exists), and its checkpoint."""
    optimizer = optimizer_class(model, T=1, **kwargs)
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(step), dtype=dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return optimizer, copy.deepcopy(optimizer.state_dict())


def refused(optimizer, state, *fragments):
    """Loading ``state`` raises one sentence with ``fragments`` and leaves ``optimizer`` as
    it was."""
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError) as err:
        optimizer.load_state_dict(state)
    message = str(err.value)
    assert "\n" not in message and message.startswith("Cannot load this checkpoint into")
    for fragment in fragments:
        assert fragment in message, message
    after = optimizer.state_dict()
    assert after["kronecker"]["steps"] == before["kronecker"]["steps"]
    for name, layer in before["kronecker"]["layers"].items():
        for key, value in layer["factors"].items():
            new = after["kronecker"]["layers"][name]["factors"][key]
            old = value["tensors"] if isinstance(value, dict) else {"": value}
            new = new["tensors"] if isinstance(new, dict) else {"": new}
            assert all(torch.equal(old[k], new[k]) for k in old)
    return message


OPTIMIZERS = [SINGD, KFAC]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=["SINGD", "KFAC"])
def test_a_wider_models_checkpoint_is_refused(optimizer_class):
    """Same layer names, other widths: before, it loaded and failed at the next step."""
    _, wide = trained(optimizer_class, mlp(width=16))
    narrow, _ = trained(optimizer_class, mlp(width=8))
    refused(narrow, wide, "has shape (8, 5)", "(16, 5)", "(a checkpoint of another model)")


def test_kfac_state_into_singd_and_back_is_refused():
    """Before: KFAC's state loaded into SINGD, which failed with KeyError 'K'."""
    _, kfac_state = trained(KFAC, mlp())
    singd, singd_state = trained(SINGD, mlp())
    refused(singd, kfac_state, "into SINGD", "it holds KFAC state", "load it into KFAC")
    kfac, _ = trained(KFAC, mlp())
    refused(kfac, singd_state, "into KFAC", "it holds SINGD state", "load it into SINGD")


def test_a_diagonal_checkpoint_into_a_dense_singd_is_refused():
    """Before: it loaded and silently turned the dense-configured optimizer diagonal."""
    _, diagonal = trained(SINGD, mlp(), structures=("diagonal", "diagonal"))
    dense, _ = trained(SINGD, mlp(), structures=("dense", "dense"))
    refused(dense, diagonal, "factor 'K' is 'diagonal' in the checkpoint", "configured 'dense'")


def test_riemannian_momentum_must_match():
    _, with_momentum = trained(SINGD, mlp(), alpha1=0.5)
    without, _ = trained(SINGD, mlp(), alpha1=0.0)
    refused(without, with_momentum, "factor 'm_C'", "does not keep (alpha1=0.0)")
    _, without_state = trained(SINGD, mlp(), alpha1=0.0)
    with_, _ = trained(SINGD, mlp(), alpha1=0.5)
    refused(with_, without_state, "has no factor 'm_C'")


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=["SINGD", "KFAC"])
def test_a_checkpoint_in_another_dtype_is_refused(optimizer_class):
    _, low = trained(optimizer_class, mlp(dtype=torch.bfloat16))
    full, _ = trained(optimizer_class, mlp())
    refused(full, low, "torch.bfloat16 in the checkpoint but torch.float32 here")


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=["SINGD", "KFAC"])
@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({}, "it has no 'state' entry"),
        ([], "it is a list, not a state_dict"),
        ({"state": {}, "param_groups": [], "kronecker": 3}, "has no 'layers' table"),
    ],
)
def test_what_is_no_checkpoint_is_one_sentence(optimizer_class, state, fragment):
    """Before: ``{}`` gave a bare KeyError 'kronecker'."""
    optimizer, _ = trained(optimizer_class, mlp())
    refused(optimizer, state, fragment)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=["SINGD", "KFAC"])
def test_a_tensor_of_the_wrong_shape_in_a_layer_is_named(optimizer_class):
    optimizer, state = trained(optimizer_class, mlp())
    factors = state["kronecker"]["layers"]["2"]["factors"]
    key = "C" if optimizer_class is SINGD else "G"
    if optimizer_class is SINGD:
        factors[key]["tensors"] = {k: t[:-1] for k, t in factors[key]["tensors"].items()}
    else:
        factors[key] = factors[key][:-1]
    refused(optimizer, state, f"layer '2' factor '{key}'", "has shape")


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=["SINGD", "KFAC"])
def test_a_fitting_checkpoint_still_loads_and_resumes(optimizer_class):
    source, state = trained(optimizer_class, mlp(), steps=3)
    target, _ = trained(optimizer_class, mlp(), steps=1)
    target.load_state_dict(state)
    assert target.state_dict()["kronecker"]["steps"] == 3


def test_a_kfac_checkpoint_without_its_counters_is_refused():
    optimizer, state = trained(KFAC, mlp())
    del state["kfac"]
    refused(optimizer, state, "no 'kfac' entry")


def test_the_checks_know_each_optimizers_accumulators():
    from singd.optim.checkpoint import ACCUMULATOR_SIDES

    assert {"SINGD": dict(SINGD.ACCUMULATORS), "KFAC": dict(KFAC.ACCUMULATORS)} == ACCUMULATOR_SIDES
