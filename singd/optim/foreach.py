"""SINGD's step with two diagonal factors, batched over layers with foreach calls.

Per layer, the natural gradient with diagonal ``K`` and ``C`` scales the weight's
columns and the bias by ``k^2`` and the rows by ``c^2`` (`SINGD._layer_directions`),
then `singd.optim.functional.heavy_ball_` updates momentum and parameters: about 12 small
dispatches per layer. Here the same per-element operations, in the same order, are made
as foreach calls over every layer's tensors at once (one for all squares, two for all
directions, at most three over all parameters for weight decay, momentum and the
parameter update), so the results are bitwise those of the per-layer path
(tests/singd/test_foreach.py).

It applies (`applies`) to one parameter group, one process, ``precision=None``, and
layers that all have diagonal ``K`` and ``C`` and an untransposed weight; every other
case takes the per-layer path. ``ENABLED = False`` forces the per-layer path (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.optim.layers import KroneckerLayer
from singd.optim.scaling import Scale, not_one
from singd.structures.diagonal import DiagonalMatrix

if TYPE_CHECKING:
    from singd.optim.singd import SINGD

ENABLED = True
"""Whether the batched path is taken where it applies (False: always per layer)."""


def applies(optimizer: SINGD, active: list[KroneckerLayer]) -> bool:
    """Whether the batched path gives the step of ``active`` (the layers with gradients)."""
    if not (ENABLED and active and len(optimizer.param_groups) == 1):
        return False
    if optimizer._escalation is not None or optimizer._ddp:
        return False
    return all(two_diagonal_factors(optimizer, layer) for layer in active)


def two_diagonal_factors(optimizer: SINGD, layer: KroneckerLayer) -> bool:
    """Whether the layer's ``K`` and ``C`` are diagonal and its weight untransposed: its
    step is then `diagonal_directions`' elementwise scaling, no ``[dW | db]`` copy."""
    state = optimizer._factors[layer.name]
    return not layer.transposed and (
        isinstance(state["K"], DiagonalMatrix) and isinstance(state["C"], DiagonalMatrix)
    )


def diagonal_directions(
    optimizer: SINGD, active: list[KroneckerLayer], divisor: Scale, factor: float = 1.0
) -> list[Tensor]:
    """The preconditioned gradient of every parameter of ``active`` (layers with two
    diagonal factors), in layer order (weight, then bias): ``[dW | db] / divisor * factor``
    scaled by ``k^2`` and ``c^2`` in the factors' dtypes and cast back (new tensors). The
    same products, in the same order, as `singd_natural_gradient` on ``[dW | db]``; one
    layer's call is `SINGD._layer_directions` for it."""
    diags = [
        optimizer._factors[layer.name][key].tensors()["diag"]
        for layer in active
        for key in ("K", "C")
    ]
    squares = torch._foreach_mul(diags, diags)
    grads, k_parts, c_parts, params = [], [], [], []
    for i, layer in enumerate(active):
        k2, c2 = squares[2 * i], squares[2 * i + 1]
        weight = layer.params[0]
        grads.append(weight.grad.flatten(1))
        k_parts.append(k2[:-1] if layer.has_bias else k2)
        c_parts.append(c2.unsqueeze(1))
        params.append(weight)
        if layer.has_bias:
            grads.append(layer.params[1].grad)
            k_parts.append(k2[-1])
            c_parts.append(c2)
            params.append(layer.params[1])
    if not_one(divisor):
        grads = torch._foreach_div(grads, divisor)
    if factor != 1.0:
        grads = torch._foreach_mul(grads, factor)
    grad_dtypes = [g.dtype for g in grads]
    if any(g.dtype != k.dtype for g, k in zip(grads, k_parts, strict=True)):
        grads = [g.to(k.dtype) for g, k in zip(grads, k_parts, strict=True)]
    steps = torch._foreach_mul(grads, k_parts)  # new tensors: scaled in place below
    if any(s.dtype != c.dtype for s, c in zip(steps, c_parts, strict=True)):
        steps = [s.to(c.dtype) for s, c in zip(steps, c_parts, strict=True)]
    torch._foreach_mul_(steps, c_parts)
    return [
        step.to(dtype).reshape(p.shape)
        for step, dtype, p in zip(steps, grad_dtypes, params, strict=True)
    ]
