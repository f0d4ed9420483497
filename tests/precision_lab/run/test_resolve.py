"""A suite's models are checked before anything runs: each way a workload can be unusable
is one sentence (exit 2), found without training."""

import pytest
import torch
from torch import nn

from precision_lab.errors import UsageError
from precision_lab.run import resolve
from precision_lab.workloads.loader import _LOADED
from precision_lab.workloads.workload import Workload


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)


class _NoSupportedLayer(nn.Module):
    """Only an Embedding and a LayerNorm: SINGD and KFAC have nothing to precondition."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x):
        return self.norm(self.embed(x.long().clamp(0, 4))).sum(1)


def _raise(*_):
    raise RuntimeError("boom")


CASES = {
    "no_layer": (
        Workload(_NoSupportedLayer, _batches),
        "has no trainable nn.Linear, nn.Conv1d, nn.Conv2d or transposed linear",
    ),
    "model_raises": (Workload(_raise, _batches), "building its model raised RuntimeError: boom"),
    "not_a_module": (Workload(lambda: 3, _batches), "its model\\(\\) returned a int, not an"),
    "batches_raise": (
        Workload(lambda: nn.Linear(3, 2), _raise),
        "its batches\\(seed\\) raised RuntimeError: boom",
    ),
    "empty": (Workload(lambda: nn.Linear(3, 2), lambda s: []), "first item is nothing"),
    "not_pairs": (
        Workload(lambda: nn.Linear(3, 2), lambda s: [torch.ones(2)]),
        "must give \\(inputs, targets\\) pairs, but its first item is a Tensor",
    ),
    "metric_raises": (
        Workload(lambda: nn.Linear(3, 2), _batches, metric=_raise),
        "its metric raised RuntimeError: boom",
    ),
    "metric_range": (
        Workload(lambda: nn.Linear(3, 2), _batches, metric=lambda m: 3.5),
        "its metric must return a number in \\[0, 1\\] \\(higher better\\), but scored the "
        "untrained model 3.5",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_workload_is_one_sentence(case, monkeypatch):
    workload, message = CASES[case]
    monkeypatch.setitem(_LOADED, (f"mine:{case}", 8), workload)
    with pytest.raises(UsageError, match=message) as caught:
        resolve.resolve_workload(f"mine:{case}", 8)
    text = str(caught.value)
    assert text.startswith(f"Model 'mine:{case}'") and "\n" not in text and text.endswith(".")


def test_a_model_without_supported_layer_is_fine_for_first_order_optimizers(monkeypatch):
    workload = Workload(_NoSupportedLayer, _batches)
    monkeypatch.setitem(_LOADED, ("mine:adamw_only", 8), workload)
    assert resolve.resolve_workload("mine:adamw_only", 8, kronecker=False) is workload


def test_builtins_pass_the_checks():
    for name in ("mlp", "cnn", "resnet", "transformer", "lm"):
        assert resolve.resolve_workload(name, 64).name == name
