"""`Workload`: what a stress suite trains, whoever wrote it: a model, its data, its loss and
how to score the trained model.

A workload is four callables and a name (``precision_lab.Workload``, docs/workloads.md):

- ``model()``: a fresh ``nn.Module`` in float32 on the CPU. The suite seeds torch before
  the call, so a workload need not seed its own initialization.
- ``batches(seed)``: an iterable of ``(inputs, targets)`` training batches (the suite takes
  as many as it has steps; it may be endless), in an order drawn from ``seed``. Inputs
  and targets are tensors, or tuples, lists or dicts of tensors; ``model(inputs)`` (or
  ``model(*inputs)``, ``model(**inputs)``) computes the outputs.
- ``loss(outputs, targets)``: a scalar tensor; by default `cross_entropy`.
- ``metric(model)``: optional, a score of the trained model in [0, 1], higher better (a
  held-out accuracy, say), reported in the summary's ``accuracy`` under ``metric_name``.

The suite casts the model to the run's dtype (``pure``) or runs it under autocast
(``mixed``), and casts only the floating tensors of every batch (token ids and labels stay
integer); while the metric runs, the model casts the floating tensors it is called with
the same way, so a metric written for float32 works at every dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACCURACY_STANDARD_ERRORS = 3.0
"""How many binomial standard errors above chance a held-out accuracy must be for a run
to have learned (`chance_accuracy`)."""

IGNORE_INDEX = -100
"""A target that `cross_entropy` leaves out (``F.cross_entropy``'s default)."""


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats) of logits over their last dimension: ``(batch, classes)``
    with ``(batch,)`` labels, or ``(batch, ..., classes)`` with ``(batch, ...)`` labels, as a
    language model's next-token logits; targets equal to `IGNORE_INDEX` count for nothing."""
    if outputs.dim() > 2:
        outputs, targets = outputs.flatten(0, -2), targets.flatten()
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


def chance_accuracy(classes: int, test_size: int) -> float:
    """The accuracy a run must exceed to have learned (a `Workload`'s ``chance``): chance,
    ``1 / classes``, plus `ACCURACY_STANDARD_ERRORS` standard errors of a guesser's
    accuracy on ``test_size`` answers, ``sqrt(p (1 - p) / n)`` (one-sided p ~ 0.001 that a
    guesser gets there). For the digits (10 classes, 360 test images): 0.1 + 3 x 0.0158 =
    0.147."""
    p = 1.0 / classes
    return p + ACCURACY_STANDARD_ERRORS * math.sqrt(p * (1.0 - p) / test_size)


@dataclass(frozen=True)
class Workload:
    """A model, its training data, its loss and optionally a score of the trained model.

    Args:
        model: ``() -> nn.Module``, a fresh float32 model on each call (torch is seeded
            before it).
        batches: ``(seed) -> iterable of (inputs, targets)``; tensors, or tuples, lists or
            dicts of tensors.
        loss: ``(outputs, targets) -> scalar tensor``; None: `cross_entropy`.
        metric: ``(model) -> float`` in [0, 1], higher better, evaluated once after the run
            (in eval mode, without gradients); None: the runs report no score.
        name: How summaries name the workload; None: the name it was loaded by.
        metric_name: How summaries name the metric; None: the metric function's name.
        chance: The metric a model reaches without learning (plus a margin for the test
            set's noise, if any); a run whose metric does not exceed it did not learn.
            None: only the loss's fall decides whether a run learned.
    """

    model: Callable[[], nn.Module]
    batches: Callable[[int], Iterable[tuple[Any, Any]]]
    loss: Callable[[Any, Any], Tensor] | None = None
    metric: Callable[[nn.Module], float] | None = None
    name: str | None = None
    metric_name: str | None = None
    chance: float | None = None

    def __post_init__(self) -> None:
        for field_name in ("model", "batches"):
            if not callable(getattr(self, field_name)):
                raise TypeError(
                    f"Workload's {field_name} must be callable, "
                    f"got {type(getattr(self, field_name)).__name__}."
                )
        for field_name in ("loss", "metric"):
            value = getattr(self, field_name)
            if value is not None and not callable(value):
                raise TypeError(
                    f"Workload's {field_name} must be callable or None, got {type(value).__name__}."
                )

    def compute_loss(self, outputs: Any, targets: Any) -> Tensor:
        """The workload's loss, or `cross_entropy` where it has none."""
        return (self.loss or cross_entropy)(outputs, targets)

    @property
    def score_name(self) -> str | None:
        """The metric's name as summaries write it; None without a metric."""
        if self.metric is None:
            return None
        name = self.metric_name or getattr(self.metric, "__name__", "metric")
        return "metric" if name == "<lambda>" else name

    def named(self, name: str) -> Workload:
        """This workload, named ``name`` unless it names itself."""
        if self.name is not None:
            return self
        return replace(self, name=name)


def map_floating(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``data`` (a tensor, or nested tuples, lists and dicts of tensors) with ``fn`` applied
    to each floating tensor; other tensors and values unchanged."""
    return map_tensors(data, lambda t: fn(t) if t.is_floating_point() else t)


def map_tensors(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``data`` with ``fn`` applied to every tensor in it (tuples, lists, dicts kept)."""
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return {key: map_tensors(value, fn) for key, value in data.items()}
    if isinstance(data, tuple | list):
        values = [map_tensors(value, fn) for value in data]
        return type(data)(*values) if hasattr(data, "_fields") else type(data)(values)
    return data


def tensors(data: Any) -> list[Tensor]:
    """Every tensor in ``data``, in order."""
    found: list[Tensor] = []
    map_tensors(data, lambda t: found.append(t) or t)
    return found


def has_floating(data: Any) -> bool:
    """Whether ``data`` holds any floating tensor (what input scaling can act on)."""
    return any(t.is_floating_point() for t in tensors(data))


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def as_score(value: Any) -> float | None:
    """A metric's value as a float when it is a finite number in [0, 1] (a Python or
    numpy number, or a one-element tensor); None otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def first_line(err: BaseException) -> str:
    """An exception's message, first line, without a closing full stop: for one-sentence
    errors that quote it."""
    lines = str(err).strip().splitlines()
    return lines[0].rstrip(".") if lines else "(no message)"


def cast_inputs(
    model: nn.Module, dtype: torch.dtype, factor: float = 1.0
) -> torch.utils.hooks.RemovableHandle:
    """Make ``model`` multiply the floating tensors it is called with by ``factor`` (in
    their own dtype) and cast them to ``dtype``, every tensor moved to the model's device,
    until the returned handle is removed; for metrics written in float32."""
    device = next(model.parameters()).device

    def move(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t.to(device)
        return (t * factor if factor != 1.0 else t).to(device, dtype)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return map_tensors(args, move), map_tensors(kwargs, move)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
