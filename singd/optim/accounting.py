"""Bytes of a Kronecker optimizer's state, by category (B).

Categories: the subclass's factor categories (SINGD: ``factors``, ``momenta``; KFAC:
``factors``, ``inverses``), then ``accumulators`` (curvature terms collected since the
last update; SINGD adds the rows its low-rank natural gradient waits for),
``param_buffers`` (momentum buffers of the Kronecker-covered parameters) and
``fallback`` (tensors of the fallback optimizer's state). probes and precision_lab's
memory model read them (docs/CONTRACTS.md).

On a model sharded with FSDP2 the parameters' state (momentum buffers, the fallback's
moments) is made of DTensors: by default only this rank's shards are counted (what this
rank holds); ``total=True`` counts their whole (global) size, the bytes one process
would hold for the whole model. Over several ranks each layer's factors live on one rank
(docs/distributed.md): ``KroneckerOptimizer.state_bytes(total=True)`` sums them over the
ranks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from singd.curvature import Factor
from singd.optim.fsdp import is_dtensor

ACCUMULATORS = "accumulators"


def held_bytes(t: Tensor, total: bool = False) -> int:
    """Bytes of ``t``: of this rank's shard for a DTensor, unless ``total`` (its global size)."""
    if is_dtensor(t) and not total:
        t = t.to_local()
    return t.numel() * t.element_size()


def tensor_bytes(state: dict[Any, dict[str, Any]], total: bool = False) -> int:
    """Bytes of the tensors in an optimizer's ``state`` (parameter -> entries)."""
    return sum(
        held_bytes(t, total)
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
    total: bool = False,
) -> dict[str, int]:
    """All categories: the factors', ``param_buffers`` and ``fallback`` (this rank's
    shards of DTensor state, or their global size with ``total``)."""
    return {
        **factor_bytes(factors, categories),
        "param_buffers": tensor_bytes(param_state, total),
        "fallback": 0 if fallback is None else tensor_bytes(fallback.state, total),
    }
