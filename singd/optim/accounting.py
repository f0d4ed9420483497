"""Bytes of a Kronecker optimizer's state, by category (B).

Categories: the subclass's factor categories (SINGD: ``factors``, ``momenta``; KFAC:
``factors``, ``inverses``), then ``accumulators`` (curvature terms collected since the
last update), ``param_buffers`` (momentum buffers of the Kronecker-covered parameters)
and ``fallback`` (tensors of the fallback optimizer's state). probes and precision_lab's
memory model read them (docs/CONTRACTS.md).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from singd.curvature import Factor

ACCUMULATORS = "accumulators"


def tensor_bytes(state: dict[Any, dict[str, Any]]) -> int:
    """Bytes of the tensors in an optimizer's ``state`` (parameter -> entries)."""
    return sum(
        t.numel() * t.element_size()
        for entry in state.values()
        for t in entry.values()
        if isinstance(t, Tensor)
    )


def factor_bytes(
    factors: dict[str, dict[str, Factor]], categories: dict[str, str]
) -> dict[str, int]:
    """Bytes of every layer's factors by category: ``categories`` maps a factor's key to
    its category; any other key is an accumulator."""
    totals = dict.fromkeys([*dict.fromkeys(categories.values()), ACCUMULATORS], 0)
    for state in factors.values():
        for key, value in state.items():
            totals[categories.get(key, ACCUMULATORS)] += value.nbytes
    return totals


def state_bytes(
    factors: dict[str, dict[str, Factor]],
    categories: dict[str, str],
    param_state: dict[Any, dict[str, Any]],
    fallback: Optimizer | None,
) -> dict[str, int]:
    """All categories: the factors', ``param_buffers`` and ``fallback``."""
    return {
        **factor_bytes(factors, categories),
        "param_buffers": tensor_bytes(param_state),
        "fallback": 0 if fallback is None else tensor_bytes(fallback.state),
    }
