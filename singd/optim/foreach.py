"""SINGD's step with two diagonal factors, batched over layers with foreach calls.

Per layer, the natural gradient with diagonal ``K`` and ``C`` scales the weight's
columns and the bias by ``k^2`` and the rows by ``c^2`` (`SINGD._layer_directions`),
`singd.optim.functional.heavy_ball_` updates momentum and parameters, and
`singd.optim.functional.singd_factor_update` updates the factors: a few dozen small
dispatches per layer. Here the same per-element operations, in the same order, are made
as foreach calls over every layer's tensors at once, so the results are bitwise those of
the per-layer path (tests/singd/test_foreach.py):

- `diagonal_step`: the directions (`diagonal_directions`), then `heavy_ball_` over all
  parameters;
- `diagonal_factor_update`: every due layer's ``K``, ``C`` and momenta; the traces are
  one ``sum`` per factor (no foreach reduction rounds as ``mean`` does), divided all at
  once, and the coefficients one float64 vector.

The squares ``k^2``, ``c^2`` are kept between steps while the factors are unchanged
(checked by the tensors' identity and version counters): the steps between
preconditioner updates (T > 1) do not recompute them.

It applies (`applies`) to one parameter group, one process, ``precision=None``, and
layers that all have diagonal ``K`` and ``C`` and an untransposed weight; every other
case takes the per-layer path. ``ENABLED = False`` forces the per-layer path (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.optim.functional import heavy_ball_
from singd.optim.layers import KroneckerLayer
from singd.optim.scaling import Scale, not_one
from singd.structures.base import mark_changed
from singd.structures.diagonal import DiagonalMatrix

if TYPE_CHECKING:
    from singd.optim.singd import SINGD

ENABLED = True
"""Whether the batched path is taken where it applies (False: always per layer)."""


def applies(optimizer: SINGD, layers: list[KroneckerLayer]) -> bool:
    """Whether the batched path gives the step (or the factor update) of ``layers``."""
    if not (ENABLED and layers and len(optimizer.param_groups) == 1):
        return False
    if optimizer._escalation is not None or optimizer._ddp:
        return False
    return all(two_diagonal_factors(optimizer, layer) for layer in layers)


def two_diagonal_factors(optimizer: SINGD, layer: KroneckerLayer) -> bool:
    """Whether the layer's ``K`` and ``C`` are diagonal and its weight untransposed: its
    step is then `diagonal_directions`' elementwise scaling, no ``[dW | db]`` copy."""
    state = optimizer._factors[layer.name]
    return not layer.transposed and (
        isinstance(state["K"], DiagonalMatrix) and isinstance(state["C"], DiagonalMatrix)
    )


class DiagonalParts:
    """Per parameter of some layers, in layer order (weight, then bias): the parameter and
    the factor squares it is scaled by (``k^2`` as a row, ``c^2`` as a column: views of
    buffers kept from step to step), with the factor tensors they were computed from and
    their versions then."""

    def __init__(self, optimizer: SINGD, layers: list[KroneckerLayer]) -> None:
        self.layers = layers
        self.diags = _diags(optimizer, layers)
        self.squares = torch._foreach_mul(self.diags, self.diags)
        self.versions = [d._version for d in self.diags]
        self.params: list[Tensor] = []
        self.k_parts: list[Tensor] = []
        self.c_parts: list[Tensor] = []
        for i, layer in enumerate(layers):
            k2, c2 = self.squares[2 * i], self.squares[2 * i + 1]
            self.params.append(layer.params[0])
            self.k_parts.append(k2[:-1] if layer.has_bias else k2)
            self.c_parts.append(c2.unsqueeze(1))
            if layer.has_bias:
                self.params.append(layer.params[1])
                self.k_parts.append(k2[-1:])  # one element, not 0-d: no scalar cast
                self.c_parts.append(c2)
        # Every parameter at most 2-D: its direction needs no reshape.
        self.plain = all(len(p.shape) <= 2 for p in self.params)

    def holds(self, optimizer: SINGD, layers: list[KroneckerLayer]) -> bool:
        """Whether these parts are those of ``layers`` (the same factor tensors); their
        squares are brought up to date where a factor has changed since."""
        if layers != self.layers:
            return False
        diags = _diags(optimizer, layers)
        if any(d is not mine for d, mine in zip(diags, self.diags, strict=True)):
            return False
        versions = [d._version for d in diags]
        if versions != self.versions:
            torch._foreach_copy_(self.squares, diags)
            torch._foreach_mul_(self.squares, diags)
            self.versions = versions
        return True


def _diags(optimizer: SINGD, layers: list[KroneckerLayer]) -> list[Tensor]:
    return [optimizer._factors[layer.name][key].diag for layer in layers for key in ("K", "C")]


def _parts(optimizer: SINGD, layers: list[KroneckerLayer]) -> DiagonalParts:
    parts = optimizer._diagonal_parts
    if parts is None or not parts.holds(optimizer, layers):
        parts = optimizer._diagonal_parts = DiagonalParts(optimizer, layers)
    return parts


def diagonal_directions(
    optimizer: SINGD, active: list[KroneckerLayer], divisor: Scale, factor: float = 1.0
) -> list[Tensor]:
    """The preconditioned gradient of every parameter of ``active`` (layers with two
    diagonal factors), in layer order (weight, then bias): ``[dW | db] / divisor * factor``
    scaled by ``k^2`` and ``c^2`` in the factors' dtypes and cast back (new tensors). The
    same products, in the same order, as `singd_natural_gradient` on ``[dW | db]``; one
    layer's call is `SINGD._layer_directions` for it."""
    parts = DiagonalParts(optimizer, active) if len(active) == 1 else _parts(optimizer, active)
    return _directions(parts, divisor, factor)


def _directions(parts: DiagonalParts, divisor: Scale, factor: float = 1.0) -> list[Tensor]:
    grads = [p.grad.flatten(1) if len(p.shape) > 2 else p.grad for p in parts.params]
    if not_one(divisor):
        grads = torch._foreach_div(grads, divisor)
    if factor != 1.0:
        grads = torch._foreach_mul(grads, factor)
    grad_dtypes = [g.dtype for g in grads]
    if any(g.dtype != k.dtype for g, k in zip(grads, parts.k_parts, strict=True)):
        grads = [g.to(k.dtype) for g, k in zip(grads, parts.k_parts, strict=True)]
    steps = torch._foreach_mul(grads, parts.k_parts)  # new tensors: scaled in place below
    if any(s.dtype != c.dtype for s, c in zip(steps, parts.c_parts, strict=True)):
        steps = [s.to(c.dtype) for s, c in zip(steps, parts.c_parts, strict=True)]
    torch._foreach_mul_(steps, parts.c_parts)
    if parts.plain and grad_dtypes == [s.dtype for s in steps]:
        return steps  # in the parameters' shapes and dtypes already
    return [
        step.to(dtype).reshape(p.shape)
        for step, dtype, p in zip(steps, grad_dtypes, parts.params, strict=True)
    ]


def diagonal_step(optimizer: SINGD, active: list[KroneckerLayer], divisor: Scale) -> None:
    """Precondition the gradients of ``active`` (`diagonal_directions`) and update momentum
    and parameters (`heavy_ball_`)."""
    group = optimizer.param_groups[0]
    parts = _parts(optimizer, active)
    heavy_ball_(
        parts.params,
        _directions(parts, divisor),
        optimizer.state,
        lr=group["lr"],
        momentum=group["momentum"],
        weight_decay=group["weight_decay"],
    )


def diagonal_factor_update(
    optimizer: SINGD, layers: list[KroneckerLayer], grad_unscaling: Scale
) -> None:
    """`SINGD._update_preconditioner` for every layer of ``layers`` at once, bitwise: the
    operations of `singd.optim.functional.singd_factor_update` on diagonal factors, each
    made for all layers by one foreach call. Factors of several dtypes: per layer."""
    states = [optimizer._factors[layer.name] for layer in layers]
    factors = [s[key].diag for s in states for key in ("K", "C")]
    dtype = factors[0].dtype
    if any(f.dtype != dtype for f in factors):
        for layer in layers:
            optimizer._update_preconditioner(layer, grad_unscaling)
        return
    # The dtype `mean` sums in, and in which a 0-d coefficient multiplies the factors.
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    group = optimizer.param_groups[0]
    alpha1, beta1 = group["alpha1"], group["lr_cov"]
    beta1 = float(beta1(optimizer.steps)) if callable(beta1) else beta1
    c = 0.5 * ((1.0 - alpha1) if group["normalize_lr_cov"] else 1.0)
    # P(K^T K), P(C^T C): the squares the step keeps (`DiagonalParts`), read only here.
    squares = _parts(optimizer, layers).squares
    new_momenta = [s.pop(key) for s in states for key in ("H_K", "H_C")]
    curvatures = [m.diag for m in new_momenta]
    n = len(layers)
    coefficients = _scales(layers, group, c, grad_unscaling, factors[0].device)
    if not group["kfac_like"]:
        # avg(H_C), avg(H_K), avg(C^T C), avg(K^T K) per layer (the traces that scale H_K,
        # H_C, K^T K, C^T C): `mean` (sum, divide, round to the dtype), then in float64.
        means = [
            t
            for i in range(n)
            for t in (curvatures[2 * i + 1], curvatures[2 * i], squares[2 * i + 1], squares[2 * i])
        ]
        dims = torch.tensor([t.shape[0] for t in means], dtype=opmath, device=factors[0].device)
        traces = torch.stack([t.sum(dtype=opmath) for t in means]).div_(dims)
        coefficients = traces.to(dtype).to(torch.float64).view_as(coefficients) * coefficients
    # Per layer the coefficients of H_K, H_C, K^T K, C^T C, in that order.
    each = coefficients.flatten().to(opmath).unbind()
    # m' = coef_H H + coef_S S^T S - c I in H's memory, plus alpha1 m (as per layer).
    torch._foreach_mul_(curvatures, [each[4 * i + j] for i in range(n) for j in (0, 1)])
    damping = torch._foreach_mul(squares, [each[4 * i + j] for i in range(n) for j in (2, 3)])
    torch._foreach_add_(curvatures, damping, alpha=1.0)
    # -c as a one-element vector in the dtype a number is computed in (the same sums, no
    # cast of a number per tensor).
    minus_c = torch.full((1,), -c, dtype=opmath, device=factors[0].device)
    torch._foreach_add_(curvatures, [minus_c] * len(curvatures))
    if alpha1 != 0.0:
        momenta = [s[key].diag for s in states for key in ("m_K", "m_C")]
        torch._foreach_add_(curvatures, momenta, alpha=alpha1)
    products = torch._foreach_mul(factors, curvatures)  # K m_K, C m_C
    if group["normalize_lr_cov"]:
        norms = torch.stack(torch._foreach_max(torch._foreach_abs(curvatures)))
        steps = -(beta1 / norms.to(torch.float64).clamp_min(1.0))
        torch._foreach_add_(factors, torch._foreach_mul(products, steps.to(opmath).unbind()))
    else:
        torch._foreach_add_(factors, products, alpha=-beta1)
    mark_changed(factors)  # `DiagonalParts` refreshes the squares by version
    if alpha1 != 0.0:  # no momentum buffers at all otherwise
        for i, s in enumerate(states):
            s["m_K"], s["m_C"] = new_momenta[2 * i], new_momenta[2 * i + 1]


def _scales(layers: list[KroneckerLayer], group: dict, c: float, grad_unscaling: Scale, device):
    """Per layer (rows, float64) what multiplies avg(H_C) in m_K', avg(H_K) in m_C',
    avg(C^T C) and avg(K^T K) in the damping terms (IKFAC: the coefficients of H_K, H_C,
    K^T K, C^T C), each computed as `singd_factor_update` computes it: in Python numbers,
    or in 0-d tensors with a tensor ``grad_unscaling`` (a GradScaler's)."""
    mean_loss = group["loss_average"] is not None
    damping = c * group["damping"]
    rows = []
    for layer in layers:
        # As `SINGD._update_preconditioner`: the input side averaged over the calls, the
        # output side un-scaled and, for a mean loss, times the backward passes.
        scale_K = 1.0 / max(layer.passes, 1)
        scale_C = grad_unscaling * (max(layer.backward_passes, 1) if mean_loss else 1.0)
        if group["kfac_like"]:
            rows.append((c * scale_K, c * scale_C, damping, damping))
        else:
            rows.append((c * scale_C * scale_K, c * scale_K * scale_C, damping, damping))
    if isinstance(grad_unscaling, Tensor):
        return torch.stack(
            [
                torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in row])
                for row in rows
            ]
        )
    return torch.tensor(rows, dtype=torch.float64, device=device)
