"""A suite's model names turned into checked workloads, before anything runs.

`resolve_workload` loads a workload by name (`precision_lab.workloads.loader`) and, the
first time it sees it, checks what can be checked without training: that its model
builds, that it has a layer SINGD and KFAC precondition (the optimizers' own layer
discovery, `singd.optim.coverage.find_layers`; without one a "SINGD" run would be its
fallback AdamW under another name), that its batches give ``(inputs, targets)`` pairs,
and that its metric scores the untrained model in [0, 1]. A failure is a `UsageError` of
one sentence (exit 2), raised by `precision_lab.run.suite.Suite.validate`.
"""

from __future__ import annotations

import warnings
from itertools import islice

import torch

from precision_lab.errors import UsageError
from precision_lab.workloads.builtin import build_module
from precision_lab.workloads.knobs import Condition
from precision_lab.workloads.loader import load_workload
from precision_lab.workloads.workload import Workload, as_score, first_line, has_floating
from singd.optim.coverage import find_layers

_CHECKED: set[Workload] = set()
"""Workloads checked already (the dicts here hold the workloads themselves, not their ids,
which a workload garbage-collected could pass on to another)."""


def resolve_workload(name: str, batch_size: int, *, kronecker: bool = True) -> Workload:
    """The workload ``name`` names, checked once per process.

    Args:
        name: A built-in's name or an import path (`precision_lab.workloads.loader`).
        batch_size: Examples per batch of a built-in.
        kronecker: Whether SINGD or KFAC will train it (then it needs a layer they
            precondition).

    Raises:
        UsageError: In one sentence naming the model and what is wrong.
    """
    workload = load_workload(name, batch_size)
    if workload not in _CHECKED:
        _check(workload, name)
        _CHECKED.add(workload)
    if kronecker:
        _check_layers(workload, name)
    return workload


def _check(workload: Workload, name: str) -> None:
    module = _build(workload, name)
    try:
        first = next(iter(islice(workload.batches(0), 1)), None)
    except Exception as err:
        raise UsageError(
            f"Model {name!r}: its batches(seed) raised {type(err).__name__}: {first_line(err)}."
        ) from None
    if not (isinstance(first, tuple | list) and len(first) == 2):
        raise UsageError(
            f"Model {name!r}: its batches(seed) must give (inputs, targets) pairs, "
            f"but its first item is {_kind(first)}."
        )
    if workload.metric is not None:
        module.eval()
        try:
            with torch.no_grad():
                score = workload.metric(module)
        except Exception as err:
            raise UsageError(
                f"Model {name!r}: its metric raised {type(err).__name__}: {first_line(err)}."
            ) from None
        if as_score(score) is None:
            raise UsageError(
                f"Model {name!r}: its metric must return a number in [0, 1] (higher better), "
                f"but scored the untrained model {score!r}."
            )


def _check_layers(workload: Workload, name: str) -> None:
    module = _build(workload, name)
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        layers = find_layers(module, [{"params": params}])
    except ValueError as err:
        raise UsageError(f"Model {name!r}: {first_line(err)}.") from None
    if not layers:
        raise UsageError(
            f"Model {name!r} has no trainable nn.Linear, nn.Conv1d, nn.Conv2d or transposed "
            "linear (GPT-2 Conv1D) layer, the only layers SINGD and KFAC precondition; "
            "train it with adamw or sgd, or give it such a layer."
        )


_MODULES: dict[Workload, torch.nn.Module] = {}


def _build(workload: Workload, name: str) -> torch.nn.Module:
    if workload not in _MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = build_module(workload, 0)
        except Exception as err:
            raise UsageError(
                f"Model {name!r}: building its model raised {type(err).__name__}: "
                f"{first_line(err)}."
            ) from None
        if not isinstance(module, torch.nn.Module):
            raise UsageError(
                f"Model {name!r}: its model() returned a {type(module).__name__}, not an nn.Module."
            )
        _MODULES[workload] = module
    return _MODULES[workload]


_FLOATING: dict[Workload, bool] = {}


def inapplicable(condition: Condition, workload: Workload) -> str | None:
    """Why ``condition`` means nothing for ``workload`` (its runs would repeat the
    baseline's under another name), or None when it applies: input scaling acts on
    floating inputs only, and a workload whose first training batch has none (token ids)
    is not scaled by it."""
    if condition.input_max is None:
        return None
    if workload not in _FLOATING:
        inputs, _ = next(iter(workload.batches(0)))
        _FLOATING[workload] = has_floating(inputs)
    if _FLOATING[workload]:
        return None
    return (
        f"{condition.name} scales floating inputs, and the inputs of {workload.name} have "
        "none (integer token ids or labels only)"
    )


def _kind(value: object) -> str:
    if value is None:
        return "nothing (the iterable is empty)"
    return f"a {type(value).__name__}"
