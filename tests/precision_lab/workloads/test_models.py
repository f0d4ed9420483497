"""The suites' models: shapes, dtypes, determinism, and real parameters for every family."""

import pytest
import torch
from torch import nn

from precision_lab.workloads.models import MODELS, NUM_CLASSES, NUM_FEATURES, build_model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_shape_and_dtype(name, dtype):
    model = build_model(name, seed=0).to(dtype)
    x = torch.randn(5, NUM_FEATURES, dtype=dtype)
    logits = model(x)
    assert logits.shape == (5, NUM_CLASSES)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_seed_fixes_the_weights(name):
    a, b, c = build_model(name, 0), build_model(name, 0), build_model(name, 1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_building_does_not_touch_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("transformer", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_layer_kinds():
    """The CNNs have convolutions (the residual one BatchNorm too); the transformer has
    the layers the Kronecker optimizers leave to their fallback (LayerNorm, Embedding,
    attention)."""
    kinds = {name: {type(m) for m in build_model(name, 0).modules()} for name in MODELS}
    assert nn.Conv2d in kinds["cnn"] and nn.Linear in kinds["cnn"]
    assert {nn.LayerNorm, nn.Embedding, nn.MultiheadAttention} <= kinds["transformer"]
    assert nn.Conv2d not in kinds["mlp"]
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds["resnet"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'; expected one of mlp, cnn, res"):
        build_model("resnet50", 0)
