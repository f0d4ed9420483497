"""The condition probe: how well conditioned the preconditioner is, and what precision costs.

Read from ``optimizer.curvature_state()`` (`singd.curvature.LayerCurvature`) only, by
each factor's role (`singd.curvature.FactorRole`), never by its name.

- Extreme singular values ``sigma_max``, ``sigma_min`` and ``condition_number =
  sigma_max / sigma_min`` of each factor but momenta, in float64: a structured one
  (SINGD's ``K``, ``C``) through the structure's ``extreme_singular_values()``
  (diagonal: exact in O(d); block-diagonal: per block; otherwise a dense float64 SVD);
  for a ``preconditioner`` factor ``S`` also of ``S S^T`` (recorded as tensor ``SST``:
  ``KKT``, ``CCT``) without a second decomposition, since ``sigma_i(S S^T) =
  sigma_i(S)^2`` and so ``cond(S S^T) = cond(S)^2``. Dense factors (KFAC's ``A``, ``G``,
  damped, exactly as inverted, and ``A_inv``, ``G_inv``): a symmetric one by
  ``eigvalsh`` (its singular values are the eigenvalues' magnitudes, at a third of an
  SVD's cost), any other by ``svdvals``. A factor with a non-finite entry gives NaN.
- Inversion residual ``||S S^-1 - I||_F`` of a ``statistic`` and the ``inverse`` on its
  side (Frobenius norm, dimensionless; 0 for an exact inverse, ``sqrt(d)`` for a useless
  one), with the product computed in the stored inverse's dtype, so it shows what that
  dtype's rounding did; recorded under the inverse's name.
- Differential precision error of the update: with ``g`` the layer's gradient matrix,
  ``u = P(g)`` computed in the dtype the preconditioner is stored in (the lowest precision
  among its factors: what the optimizer itself computes in) and ``u* = P(g)`` recomputed in
  float64 from the same state, ``precond_rel_error = ||u - u*||_F / ||u*||_F`` and
  ``precond_angle = 2 atan2(||u/|u| - u*/|u*|||, ||u/|u| + u*/|u*|||)`` (radians; this
  form keeps small angles accurate where ``acos`` of a cosine near 1 does not).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from probes.limits import dtype_name
from probes.records import Recorder

Row = tuple[str, str, str, float, str, str]
"""``(module, tensor, metric, value, unit, dtype)``."""


def square_name(name: str) -> str:
    """The tensor name under which ``S S^T`` of a preconditioner factor ``S`` is recorded."""
    return f"{name}{name}T"


def _dense(factor) -> Tensor:
    return factor if isinstance(factor, Tensor) else factor.to_dense()


@torch.no_grad()
def extreme_singular_values(factor) -> tuple[float, float]:
    """``(sigma_max, sigma_min)`` of a structured matrix or dense tensor, in float64."""
    if not isinstance(factor, Tensor):
        smax, smin = factor.extreme_singular_values()
        return float(smax), float(smin)
    matrix = factor.detach().to(dtype=torch.float64, device="cpu")
    if not bool(torch.isfinite(matrix).all()):
        return math.nan, math.nan
    if torch.equal(matrix, matrix.T):
        values = torch.linalg.eigvalsh(matrix).abs()
    else:
        values = torch.linalg.svdvals(matrix)
    return float(values.max()), float(values.min())


def _ratio(top: float, bottom: float) -> float:
    if math.isnan(top) or math.isnan(bottom):
        return math.nan
    return top / bottom if bottom > 0 else math.inf


def _singular_rows(layer: str, name: str, factor, dtype: str, squared: bool) -> Iterator[Row]:
    smax, smin = extreme_singular_values(factor)
    yield layer, name, "sigma_max", smax, "", dtype
    yield layer, name, "sigma_min", smin, "", dtype
    yield layer, name, "condition_number", _ratio(smax, smin), "", dtype
    if squared:
        square = square_name(name)
        yield layer, square, "sigma_max", smax**2, "", dtype
        yield layer, square, "sigma_min", smin**2, "", dtype
        yield layer, square, "condition_number", _ratio(smax, smin) ** 2, "", dtype


@torch.no_grad()
def inversion_residual(factor, inverse) -> float:
    """``||S S^-1 - I||_F`` with the product in the inverse's stored dtype (float64 norm)."""
    S, S_inv = _dense(factor), _dense(inverse)
    product = S.to(S_inv.dtype) @ S_inv
    eye = torch.eye(S.shape[0], dtype=product.dtype, device=product.device)
    return float(torch.linalg.matrix_norm((product - eye).to(torch.float64)))


@torch.no_grad()
def precondition_error(precondition, gradient: Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """``(relative error, angle in radians)`` of ``precondition`` in ``dtype`` vs float64."""
    low = precondition(gradient.detach().to(dtype)).to(torch.float64)
    exact = precondition(gradient.detach().to(torch.float64))
    norm_exact, norm_low = torch.linalg.norm(exact), torch.linalg.norm(low)
    rel = float(torch.linalg.norm(low - exact) / norm_exact)
    if not (norm_low > 0 and norm_exact > 0):
        return rel, math.nan
    a, b = low / norm_low, exact / norm_exact
    angle = 2 * torch.atan2(torch.linalg.norm(a - b), torch.linalg.norm(a + b))
    return rel, float(angle)


def _lowest_precision(dtypes: list[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def condition_rows(layers: list) -> list[Row]:
    """All condition metrics of ``curvature_state()``'s layers, as `Row` s."""
    rows: list[Row] = []
    for layer in layers:
        for name, factor in layer.factors.items():
            kind = layer.roles[name].kind
            if kind == "momentum":
                continue
            dtype = dtype_name(factor.dtype)
            rows.extend(_singular_rows(layer.name, name, factor, dtype, kind == "preconditioner"))
        for name, statistic in layer.named("statistic").items():
            for inverse_name, inverse in layer.named("inverse", layer.roles[name].side).items():
                residual = inversion_residual(statistic, inverse)
                rows.append(
                    (
                        layer.name,
                        inverse_name,
                        "inversion_residual",
                        residual,
                        "",
                        dtype_name(inverse.dtype),
                    )
                )
        if layer.gradient is not None and layer.factors:
            dtype = _lowest_precision([f.dtype for f in layer.factors.values()])
            rel, angle = precondition_error(layer.precondition, layer.gradient, dtype)
            rows.append((layer.name, "update", "precond_rel_error", rel, "", dtype_name(dtype)))
            rows.append((layer.name, "update", "precond_angle", angle, "rad", dtype_name(dtype)))
    return rows


class ConditionProbe:
    """Records `condition_rows` at the probe's cadence and keeps the largest condition
    number of any factor or preconditioner for the summary."""

    def __init__(self, recorder: Recorder) -> None:
        """Rows go to ``recorder``."""
        self.recorder = recorder
        self.max_condition: float | None = None

    def record(self, step: int, layers: list) -> None:
        """Write the condition rows of ``curvature_state()``'s ``layers`` at ``step``."""
        with torch.no_grad():
            rows = condition_rows(layers)
        for module, tensor, metric, value, unit, dt in rows:
            if metric == "condition_number" and not math.isnan(value):
                top = self.max_condition
                self.max_condition = value if top is None else max(top, value)
            self.recorder.add(
                step, "condition", metric, value, module=module, tensor=tensor, dtype=dt, unit=unit
            )
