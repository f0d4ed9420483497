"""Per-tensor numerics statistics, measured against the tensor's dtype and the run's dtype.

`tensor_stats` returns one float64 vector per tensor, device-side, so that a whole step's
statistics are brought to the host with one synchronisation. With ``x`` the tensor,
``F`` its finite entries, ``N = {x in F : x != 0}``, ``L`` its dtype's `Limits` and ``R``
the run's dtype:

==========================  =============================================================
metric                      value (unit)
==========================  =============================================================
``nan_count``               ``#{x is NaN}`` (count)
``posinf_count``            ``#{x = +inf}`` (count)
``neginf_count``            ``#{x = -inf}`` (count)
``overflow_risk_fraction``  ``#{x in F : |x| > L.max / 2} / numel`` (fraction)
``subnormal_fraction``      ``#{x in N : |x| < L.tiny} / #N``: subnormal in its own dtype
``underflow_fraction``      ``#{x in N : |cast_R(x)| < R.tiny} / #N``: subnormal or
                            flushed to zero once cast to ``R`` (equals the subnormal
                            fraction when the tensor already is in ``R``)
``cast_overflow_count``     ``#{x in F : cast_R(x) = +-inf}`` (count)
``amax``                    ``max |x|`` over ``F``, 0 when ``F`` is empty (tensor units)
``min_nonzero``             ``min |x|`` over ``N``, NaN when ``N`` is empty (tensor units)
==========================  =============================================================

Fractions with an empty denominator are 0. Casting is done, not modelled, so rounding at
the boundaries (a value just below ``R.tiny`` that rounds up to it) is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probes.limits import limits

STAT_METRICS = (
    "nan_count",
    "posinf_count",
    "neginf_count",
    "overflow_risk_fraction",
    "subnormal_fraction",
    "underflow_fraction",
    "cast_overflow_count",
    "amax",
    "min_nonzero",
)

STAT_UNITS = {
    "nan_count": "count",
    "posinf_count": "count",
    "neginf_count": "count",
    "overflow_risk_fraction": "fraction",
    "subnormal_fraction": "fraction",
    "underflow_fraction": "fraction",
    "cast_overflow_count": "count",
    "amax": "",
    "min_nonzero": "",
}


@torch.no_grad()
def tensor_stats(tensor: Tensor, run_dtype: torch.dtype) -> Tensor:
    """The `STAT_METRICS` of one floating tensor as a float64 vector on its device.

    Args:
        tensor: Any floating tensor; read, never modified.
        run_dtype: The run's (low-precision) dtype that cast metrics refer to.

    Returns:
        A vector of ``len(STAT_METRICS)`` float64 values in `STAT_METRICS` order.
    """
    x = tensor.detach()
    own = limits(x.dtype)
    finite = torch.isfinite(x)
    magnitude = torch.where(finite, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    nonzero = magnitude > 0
    # Counts divided in float64: a float32 quotient would round the fraction.
    n_nonzero = nonzero.sum().double().clamp(min=1)
    cast = magnitude.to(run_dtype) if run_dtype != x.dtype else magnitude
    smallest = torch.where(
        nonzero, magnitude, torch.full((), torch.inf, dtype=x.dtype, device=x.device)
    )
    numel = max(x.numel(), 1)
    values = [
        torch.isnan(x).sum(),
        (x == torch.inf).sum(),
        (x == -torch.inf).sum(),
        (magnitude > own.overflow_risk).sum().double() / numel,
        (nonzero & (magnitude < own.tiny)).sum() / n_nonzero,
        (nonzero & (cast < limits(run_dtype).tiny)).sum() / n_nonzero,
        torch.isinf(cast).sum(),
        magnitude.max() if x.numel() else torch.zeros((), device=x.device),
        smallest.min() if x.numel() else torch.full((), torch.inf, device=x.device),
    ]
    out = torch.stack([v.to(torch.float64) for v in values])
    # An empty N has no smallest element: +inf from the fill above becomes NaN.
    out[-1] = torch.where(torch.isinf(out[-1]), torch.nan, out[-1])
    return out
