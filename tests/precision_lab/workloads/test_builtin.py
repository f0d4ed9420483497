"""The built-in workloads: what each gives the suite, and what SINGD preconditions in it."""

import warnings

import pytest
import torch

from precision_lab.specs import parse_spec
from precision_lab.workloads.builtin import BUILTINS, build_builtin, build_module, digits_workload
from precision_lab.workloads.data import synthetic
from precision_lab.workloads.workload import call_model


@pytest.mark.parametrize("name", list(BUILTINS))
def test_each_builtin_has_batches_a_loss_and_a_named_metric_with_its_chance(name):
    workload = build_builtin(name, 16)
    model = build_module(workload, 0)
    inputs, targets = next(iter(workload.batches(0)))
    assert targets.dtype == torch.int64 and len(targets) == 16
    loss = workload.compute_loss(call_model(model, inputs), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with torch.no_grad():
        score = workload.metric(model.eval())
    assert 0 <= score <= 1
    assert workload.score_name == ("answer_accuracy" if name == "lm" else "test_accuracy")
    assert 0 < workload.chance < 0.2


def test_synthetic_data_has_no_metric():
    workload = digits_workload("mlp", 8, synthetic())
    assert workload.metric is None and workload.chance is None and workload.score_name is None


def _coverage(name):
    workload = build_builtin(name, 8)
    model = build_module(workload, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = parse_spec("singd:diagonal").build(model, {})
        inputs, targets = next(iter(workload.batches(0)))
        workload.compute_loss(call_model(model, inputs), targets).backward()
        optimizer.step()
    return optimizer.coverage()


def test_the_language_model_is_preconditioned_but_for_embeddings_and_norms():
    """Every projection is a Linear; the tied token embedding counts with the head."""
    coverage = _coverage("lm")
    by_type = coverage.by_type
    assert set(by_type) == {"Linear", "Embedding", "LayerNorm"}
    assert by_type["Linear"].fraction == 1.0
    assert by_type["Embedding"].fallback_elements == 12 * 64  # positions only: tokens are tied
    assert by_type["LayerNorm"].fallback_elements == 5 * 2 * 64
    assert coverage.fraction == pytest.approx(100_544 / 101_952)


def test_the_residual_cnn_leaves_only_batchnorm_to_the_fallback():
    by_type = _coverage("resnet").by_type
    assert by_type["Conv2d"].fraction == by_type["Linear"].fraction == 1.0
    assert by_type["BatchNorm2d"].preconditioned_elements == 0
    assert by_type["BatchNorm2d"].fallback_elements == 5 * 2 * 16
