"""Bad input is refused at construction with one sentence naming the value."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from singd import SINGD


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


BAD = [
    ("lr", -0.1, "lr must be a number >= 0, got -0.1."),
    ("lr", float("nan"), "lr must be a number >= 0, got nan."),
    ("lr", "0.1", "lr must be a number >= 0, got '0.1'."),
    ("momentum", 1.0, "momentum must be a number >= 0 and < 1, got 1.0."),
    ("damping", -1e-3, "damping must be a number >= 0, got -0.001."),
    ("alpha1", -0.5, "alpha1 must be a number >= 0 and < 1, got -0.5."),
    ("weight_decay", -1, "weight_decay must be a number >= 0, got -1."),
    ("T", 0, "T must be a positive integer, got 0."),
    ("T", 2.0, "T must be a positive integer, got 2.0."),
    ("lr_cov", -0.01, "lr_cov must be a number >= 0, got -0.01."),
    ("loss_average", "mean", "loss_average must be None, 'batch' or 'batch+sequence', got 'mean'."),
    ("kfac_approx", "average", "kfac_approx must be 'expand' or 'reduce', got 'average'."),
    ("structures", "dense", "structures must be a pair of names (K, C)"),
    ("structures", ("dense", "blockdiag"), "'blockdiag'"),
    ("preconditioner_dtype", (torch.int32, None), "preconditioner_dtype must be a pair"),
    ("preconditioner_dtype", torch.float32, "preconditioner_dtype must be a pair"),
    ("kfac_like", "yes", "kfac_like must be True or False, got 'yes'."),
    ("init_grad_scale", 0.0, "init_grad_scale must be a number > 0, got 0.0."),
    ("fallback", "sgd", "fallback must be 'adamw', None or a callable"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_hyperparameter_is_named(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        SINGD(mlp(), **{name: value})
    text = str(error.value)
    assert text.count(". ") == 0 or name == "structures", text  # one sentence


def test_unknown_structure_lists_the_valid_forms():
    with pytest.raises(ValueError, match=r"block\{N\}diagonal") as error:
        SINGD(mlp(), structures=("dense", "toeplitz"))
    assert "hierarchical{K1}_{K2}" in str(error.value)


def test_bad_value_in_a_parameter_group_names_the_group():
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "T": -3}]
    with pytest.raises(ValueError, match=re.escape("T (parameter group 1) must be")):
        SINGD(model, groups)


@pytest.mark.parametrize("fallback", ["adamw", None])
def test_model_without_supported_layer(fallback):
    with pytest.raises(ValueError, match="model has no nn.Linear, nn.Conv1d, nn.Conv2d"):
        SINGD(nn.Sequential(nn.LayerNorm(3), nn.Embedding(4, 3)), fallback=fallback)


def test_params_without_a_supported_layer():
    model = mlp()
    with pytest.raises(ValueError, match="whose weight is among the optimized parameters"):
        SINGD(model, [model[0].bias])


def test_weight_and_bias_in_different_groups():
    model = mlp()
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias, *model[2].parameters()]}]
    with pytest.raises(ValueError, match="weight and bias of layer '0' are in parameter groups"):
        SINGD(model, groups)


def test_data_parallel_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        SINGD(nn.DataParallel(mlp()))


def test_kfac_like_sets_alpha1_to_zero_with_a_warning():
    with pytest.warns(UserWarning, match="alpha1=0.5 is set to 0"):
        optimizer = SINGD(mlp(), kfac_like=True)
    assert optimizer.param_groups[0]["alpha1"] == 0.0
    assert all("m_K" not in view.factors for view in optimizer.curvature_state())


def test_per_group_hyperparameters_are_used():
    model = mlp()
    groups = [
        {"params": model[0].parameters(), "structures": ("diagonal", "dense"), "lr": 0.0},
        {"params": model[2].parameters()},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = SINGD(model, groups, T=1)
    views = {view.name: view for view in optimizer.curvature_state()}
    assert views["0"].factors["K"].name == "diagonal" and views["2"].factors["K"].name == "dense"
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
