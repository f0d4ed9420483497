"""The workload interface: its default loss, nested batches, dtype casting and checks."""

import math
from collections import namedtuple

import pytest
import torch
from torch import nn

import precision_lab
from precision_lab.workloads.workload import (
    IGNORE_INDEX,
    Workload,
    as_score,
    call_model,
    cast_inputs,
    chance_accuracy,
    cross_entropy,
    has_floating,
    map_floating,
)


def _reference_cross_entropy(logits, labels):
    """Mean of -log softmax at the label, in float64, over the labels not ignored."""
    logits, labels = logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    kept = labels != IGNORE_INDEX
    log_p = logits[kept] - logits[kept].logsumexp(dim=1, keepdim=True)
    return -log_p[torch.arange(int(kept.sum())), labels[kept]].mean()


def test_default_loss_is_cross_entropy_for_classes_and_sequences():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    expected = _reference_cross_entropy(logits, labels)
    assert torch.allclose(cross_entropy(logits, labels).double(), expected)
    seq_logits, seq_labels = torch.randn(4, 6, 7), torch.randint(0, 7, (4, 6))
    seq_labels[:, :3] = IGNORE_INDEX  # positions without an answer count for nothing
    got = cross_entropy(seq_logits, seq_labels).double()
    assert torch.allclose(got, _reference_cross_entropy(seq_logits, seq_labels))
    assert Workload(nn.Linear, lambda s: []).compute_loss(logits, labels) == cross_entropy(
        logits, labels
    )


def test_only_floating_tensors_are_mapped_through_nested_batches():
    batch = {
        "ids": torch.tensor([1, 2]),
        "pair": (torch.ones(2), [torch.zeros(2, dtype=torch.float64), "text"]),
    }
    out = map_floating(batch, lambda t: t.to(torch.bfloat16))
    assert out["ids"].dtype == torch.int64
    assert out["pair"][0].dtype == torch.bfloat16
    assert out["pair"][1][0].dtype == torch.bfloat16
    assert out["pair"][1][1] == "text"
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert has_floating(batch) and not has_floating({"ids": torch.tensor([1])})
    pair = namedtuple("Pair", "x ids")(torch.ones(1), torch.tensor([1]))
    mapped = map_floating(pair, lambda t: t.half())
    assert type(mapped) is type(pair) and mapped.x.dtype == torch.float16 and mapped.ids is pair.ids


def test_models_are_called_with_dicts_tuples_and_tensors():
    def forward(*args, **kwargs):
        return args, kwargs

    assert call_model(forward, {"a": 1}) == ((), {"a": 1})
    assert call_model(forward, (1, 2)) == ((1, 2), {})
    assert call_model(forward, 3) == ((3,), {})


def test_a_bfloat16_model_takes_float32_inputs_while_casting():
    model = nn.Embedding(4, 3).to(torch.bfloat16)
    head = nn.Linear(3, 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        head(torch.ones(1, 3))
    handle = cast_inputs(head, torch.bfloat16)
    assert head(torch.ones(1, 3)).dtype == torch.bfloat16
    handle.remove()
    embedding_handle = cast_inputs(model, torch.bfloat16)
    assert model(torch.tensor([1])).dtype == torch.bfloat16  # ids stay integer
    embedding_handle.remove()


def test_workload_names_its_metric_and_refuses_what_is_not_callable():
    def held_out(model):
        return 0.5

    assert Workload(nn.Linear, lambda s: [], metric=held_out).score_name == "held_out"
    assert Workload(nn.Linear, lambda s: [], metric=lambda m: 0.5).score_name == "metric"
    named = Workload(nn.Linear, lambda s: [], metric=held_out, metric_name="f1")
    assert named.score_name == "f1"
    assert Workload(nn.Linear, lambda s: []).score_name is None
    with pytest.raises(TypeError, match="Workload's batches must be callable, got list"):
        Workload(nn.Linear, [])
    with pytest.raises(TypeError, match="Workload's metric must be callable or None"):
        Workload(nn.Linear, lambda s: [], metric=0.5)


def test_a_name_given_by_the_workload_wins_over_the_loaders():
    assert Workload(nn.Linear, lambda s: []).named("file:build").name == "file:build"
    assert Workload(nn.Linear, lambda s: [], name="mine").named("file:build").name == "mine"


def test_scores_are_numbers_in_the_unit_interval():
    assert as_score(0.25) == 0.25
    assert as_score(torch.tensor(0.5)) == 0.5
    assert as_score(1) == 1.0
    for bad in (1.5, -0.1, math.nan, True, "0.5", None, torch.ones(2)):
        assert as_score(bad) is None


def test_chance_accuracy_of_the_digits():
    assert chance_accuracy(10, 360) == pytest.approx(0.1 + 3 * math.sqrt(0.09 / 360))
    assert round(chance_accuracy(10, 360), 3) == 0.147


def test_the_package_exports_the_interface():
    assert precision_lab.Workload is Workload
    assert precision_lab.chance_accuracy is chance_accuracy
