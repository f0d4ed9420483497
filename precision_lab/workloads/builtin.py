"""The built-in workloads, which suites name without an import path.

Each is a `Workload` made by a function of the suite's batch size, so the built-ins go
through the interface a user's workload does:

==============  ==========================================================================
``mlp``         64-128-64-10 MLP on the digits; metric: test accuracy
``cnn``         VGG-style CNN on the digits; test accuracy
``resnet``      residual CNN with BatchNorm on the digits; test accuracy
``transformer`` one-block transformer over the image rows; test accuracy
``lm``          2-block decoder-only causal language model (tied embeddings) on the copy
                task (`precision_lab.workloads.language`); next-token accuracy on the
                answer positions of held-out sequences
==============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from precision_lab.workloads import language
from precision_lab.workloads.data import Dataset, digits
from precision_lab.workloads.models import MODELS, NUM_CLASSES
from precision_lab.workloads.workload import Workload, chance_accuracy


def digits_accuracy(model: nn.Module, data: Dataset) -> float:
    """Fraction of ``data``'s test images ``model`` classifies correctly, in [0, 1]."""
    predicted = model(data.test_x).argmax(dim=1)
    return float((predicted.cpu() == data.test_y).double().mean())


def digits_workload(model: str, batch_size: int, data: Dataset | None = None) -> Workload:
    """Model ``model`` (`MODELS`) on ``data`` (default: the digits); the test accuracy is
    its metric where the data is real (synthetic data has none)."""
    data = digits() if data is None else data
    real = data.real
    return Workload(
        model=MODELS[model],
        batches=lambda seed: data.batches(batch_size, seed),
        metric=(lambda m: digits_accuracy(m, data)) if real else None,
        name=model,
        metric_name="test_accuracy" if real else None,
        chance=chance_accuracy(NUM_CLASSES, len(data.test_y)) if real else None,
    )


def copy_lm(batch_size: int) -> Workload:
    """The causal language model on the copy task."""
    return Workload(
        model=language.CausalLM,
        batches=lambda seed: language.copy_batches(batch_size, seed),
        metric=language.answer_accuracy,
        name="lm",
        metric_name="answer_accuracy",
        chance=chance_accuracy(language.SYMBOLS, language.TEST_SIZE * language.COPY_LENGTH),
    )


BUILTINS: dict[str, Callable[[int], Workload]] = {
    **{name: (lambda batch_size, name=name: digits_workload(name, batch_size)) for name in MODELS},
    "lm": copy_lm,
}
"""Built-in name -> ``(batch_size) -> Workload``."""


def build_builtin(name: str, batch_size: int) -> Workload:
    """The built-in workload ``name`` at ``batch_size`` examples per batch.

    Raises:
        ValueError: For an unknown name, in one sentence listing the known ones.
    """
    if name not in BUILTINS:
        raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(BUILTINS)}.")
    return BUILTINS[name](batch_size)


def build_module(workload: Workload, seed: int) -> nn.Module:
    """``workload.model()`` with torch seeded from ``seed``, the global generator left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return workload.model()
