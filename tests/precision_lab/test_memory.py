"""The memory planner: formulas against what real optimizers hold after real steps."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precision_lab.errors import UsageError
from precision_lab.memory import (
    CATEGORIES,
    build_meta_model,
    model_shape,
    plan_memory,
    state_bytes,
)
from precision_lab.specs import parse_spec
from precision_lab.workloads import models
from singd.structures import get_structure

SPECS = (
    "singd:diagonal",
    "ingd",
    "ikfac",
    "singd:hierarchical15_15/dense",
    "singd:block30diagonal",
    "singd:triltoeplitz",
    "kfac:cholesky",
    "kfac:eigh",
    "adamw",
)


def _measured(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """state_bytes() where the optimizer has it; else torch's state tensors (AdamW)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    total = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return {"param_buffers": total}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("spec", SPECS)
def test_formula_equals_real_optimizer_state(spec, model_name, dtype):
    """After two real training steps, the bytes the optimizer holds equal the formula,
    category by category (the transformer's attention and norms through the fallback)."""
    model = models.MODELS[model_name]().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention out_proj moves to the fallback
        optimizer = parse_spec(spec).build(model)
        x = torch.randn(8, models.NUM_FEATURES, dtype=dtype)
        y = torch.randint(0, models.NUM_CLASSES, (8,))
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            optimizer.step()
    measured = _measured(optimizer)
    predicted = state_bytes(spec, model_shape(model), dtype)
    # `accumulators` holds curvature between a backward pass and its step: 0 after step.
    assert measured.pop("accumulators", 0) == 0
    for category in CATEGORIES:
        assert measured.get(category, 0) == predicted[category], category
    assert sum(measured.values()) == sum(predicted.values())


def test_meta_model_matches_real_model_shapes():
    """Building on the meta device reads the same shapes as the real model."""
    real = model_shape(models.Transformer(width=64, heads=4, depth=2))
    meta_model = build_meta_model("transformer", d_model=64, layers=2, heads=4)
    assert all(p.is_meta for p in meta_model.parameters())
    assert model_shape(meta_model) == real


def test_large_transformer_is_planned_without_allocating():
    """A 4096-wide, 32-block transformer (about 4.3e9 parameters, 8.6 GB in bf16) plans in
    the meta device; the dense factors follow the formula by hand."""
    model = build_meta_model("transformer", d_model=4096, layers=32)
    plan = plan_memory(model, torch.bfloat16, ["ingd", "singd:diagonal", "adamw"])
    shape = plan.shape
    d = 4096
    block = 2 * d * d + 2 * d + 2 * d * d + d  # the two MLP Linear layers, with biases
    assert sum(layer.params for layer in shape.layers) == 32 * block + (8 * d + d) + (d * 10 + 10)
    mlp_in = [layer for layer in shape.layers if layer.name.endswith("mlp.0")]
    assert {(layer.dim_k, layer.dim_c) for layer in mlp_in} == {(d + 1, 2 * d)}
    dense = sum(layer.dim_k**2 + layer.dim_c**2 for layer in shape.layers)
    assert plan.rows["ingd"]["factors"] == 2 * dense
    assert plan.rows["ingd"]["momenta"] == 2 * dense
    diag = sum(layer.dim_k + layer.dim_c for layer in shape.layers)
    assert plan.rows["singd:diagonal"]["factors"] == 2 * diag
    assert plan.total("adamw") == 2 * 2 * shape.params + 4 * shape.tensors


@pytest.mark.parametrize("name", ["block30diagonal", "hierarchical15_15", "triltoeplitz"])
def test_structure_storage_follows_reference_table(name):
    """REFERENCE.md's storage column, which the planner relies on."""
    formula = {
        "block30diagonal": lambda d: (d // 30) * 900 + (d % 30) ** 2,
        "hierarchical15_15": lambda d: 31 * d - 255,
        "triltoeplitz": lambda d: d,
    }[name]
    for d in (31, 64, 257, 4097):
        assert get_structure(name).storage_entries(d) == formula(d)


def test_user_factory_and_conv_dims():
    """A ``module:factory`` model; a grouped convolution's d_K counts C_in / groups."""
    model = build_meta_model("tests.precision_lab.test_memory:_grouped_conv_net")
    shape = model_shape(model)
    conv = shape.layers[0]
    assert (conv.kind, conv.dim_k, conv.dim_c) == ("conv2d", 8 // 2 * 3 * 3 + 1, 6)
    assert shape.fallback_params == 2 * 6  # the BatchNorm's weight and bias


def _grouped_conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 6, 3, groups=2), nn.BatchNorm2d(6), nn.Flatten())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"model": "resnet"}, "Unknown model 'resnet'"),
        ({"model": "cnn", "layers": 4}, "drop --layers"),
        ({"model": "transformer", "d_model": 100, "heads": 3}, "--heads 3 does not divide"),
        ({"model": "no_such_module_xyz:f"}, "Cannot import module"),
        ({"model": "torch:no_such_factory"}, "has no callable"),
        ({"model": "mlp", "d_model": 0}, "Sizes must be positive"),
        ({"model": "torch.nn:LayerNorm"}, "failed to build .TypeError"),
    ],
)
def test_bad_model_requests_are_one_sentence(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        build_meta_model(**kwargs)


def test_model_without_supported_layer_is_refused():
    with pytest.raises(UsageError, match="no Linear or Conv2d"):
        plan_memory(build_meta_model("tests.precision_lab.test_memory:_norm_only"), torch.float32)


def _norm_only() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(8), nn.ReLU())
