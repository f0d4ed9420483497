"""Per-factor precision escalation (``precision="auto"``): widen a factor before it fails.

Each factor starts in the dtype asked for. At the end of every step that updated a
layer's preconditioner, before the step's parameter update reads it, the optimizer hands
each factor's *readings* (0-d tensors, on the device) to `Escalation.check`; all of them
are read in one host read (one ``tolist()`` per update step, none on other steps). A
factor whose readings cross a bound below is promoted, alone, to the next wider dtype of
`WIDER` (bfloat16 / float16 -> float32 -> float64), and the optimizer redoes what the
narrow dtype spoiled (KFAC re-inverts that side; a non-finite factor restarts). Each
change is a `PrecisionEvent` in ``optimizer.precision_events``.

The bounds follow from the arithmetic of a dtype with unit roundoff ``eps`` (torch's
``finfo.eps``), largest finite ``max`` and smallest normal ``tiny``; none was tuned:

- **condition** ``kappa * eps > 1/8`` (`CONDITION_BOUND`). Storing a matrix ``M`` in the
  dtype perturbs it by about ``eps |M|``, so its inverse moves by a relative
  ``kappa eps / (1 - kappa eps)`` (the standard perturbation bound). At ``kappa eps = 1``
  the rounded matrix may be singular or indefinite (a failed Cholesky); at 1/8 the
  inverse still carries about 3 correct bits, the last point with the failure three
  binades away. ``kappa`` is the 1-norm condition number ``||M||_1 ||M^-1||_1`` of a
  KFAC factor and its stored inverse: ``O(d^2)`` on tensors the step already has, and an
  upper bound of the 2-norm condition number (at most ``d`` times it), so the check errs
  on the early side.
- **overflow headroom** ``amax > max / 2^4`` (`RANGE_BITS`): a factor's entries within
  four binades of the largest finite number. Moving averages grow by at most a factor
  ``1/(1-decay)`` per update and a preconditioning product multiplies two factors, so
  sixteen-fold headroom is what one more update needs; past it the next may be inf.
- **underflow headroom** ``min |diag| < tiny * 2^4``: the smallest diagonal entry of a
  positive definite statistic (or of SINGD's ``K``, ``C``) within four binades of the
  subnormals, where the relative spacing of the dtype degrades from ``eps`` towards 1.
  Off-diagonal entries may be tiny without harm; a diagonal entry carries a direction's
  whole scale.
- **non-finite** entries, or a **failed decomposition** (KFAC's per-inversion verdict,
  the same on-device flag its failure counter adds up): the failure itself. A factor
  whose values are no longer finite cannot be widened back: KFAC restarts its moving
  average at the next update (keeping the last good inverse until then), SINGD restarts
  ``K`` / ``C`` at the identity (and the momentum at zero).

Not read: Newton-Schulz and Cholesky residuals. ``kappa eps`` bounds both (the residual
of an inverse stored in the dtype is about ``kappa eps``), Newton-Schulz already fails
(and is counted) above its acceptance residual, and a residual costs a ``d^3`` product
per factor where the readings above cost ``d^2``. SINGD has no stored inverse, so its
factors are judged on range, non-finite entries and diagonal underflow only.

Demotion: none. A factor that crossed a bound once tends to stay near it (moving
averages move slowly), demoting would re-open the failure the promotion closed, and a
promotion that is never undone keeps a checkpoint's dtypes the whole story.

Host reads: precision=None adds none; "auto" adds one ``tolist()`` per step that updated
any preconditioner (every ``T`` steps) and none on other steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

PRECISIONS = (None, "auto")
WIDER = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float64,
}
"""The next wider dtype of each dtype that can be widened."""
CONDITION_BOUND = 1.0 / 8.0
"""Largest accepted ``kappa * eps``: about 3 correct bits left in the inverse."""
RANGE_BITS = 4
"""Binades of headroom kept to the dtype's largest finite and smallest normal numbers."""
READINGS = ("nonfinite", "failed", "amax", "min_diagonal", "condition")
"""What a factor's reading tensor holds, in order (NaN where a reading does not apply)."""


@dataclass(frozen=True)
class PrecisionEvent:
    """One factor's change of dtype.

    Attributes:
        step: The optimizer step (``optimizer.steps`` while stepping) that changed it.
        layer: The layer's name.
        factor: The factor's name (``A``, ``G_inv``, ``K``, ...).
        from_dtype, to_dtype: torch names (``bfloat16``).
        metric: The reading that crossed its bound (one of `READINGS`).
        value: The reading (``condition``: ``kappa * eps``; ranges: the value in the
            factor's units; ``nonfinite``, ``failed``: 1).
        bound: The bound it crossed.
    """

    step: int
    layer: str
    factor: str
    from_dtype: str
    to_dtype: str
    metric: str
    value: float
    bound: float


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def widenings(dtype: torch.dtype) -> list[torch.dtype]:
    """``dtype`` and every dtype it can be promoted to, narrowest first."""
    chain = [dtype]
    while chain[-1] in WIDER:
        chain.append(WIDER[chain[-1]])
    return chain


def readings(
    matrix: Tensor,
    *,
    failed: Tensor | None = None,
    inverse: Tensor | None = None,
    diagonal: Tensor | None = None,
) -> Tensor:
    """A factor's readings as one float64 vector on its device (see `READINGS`).

    ``amax`` is the largest magnitude, NaN when an entry is not finite (``nonfinite``
    then decides). Every reading costs one or two passes over the factor in its stored
    dtype (``aminmax``; absolute column sums for the condition), never a float64 copy.

    Args:
        matrix: The stored factor (a tensor; a structured matrix's stored tensors
            concatenated do as well for range and finiteness).
        failed: 0-d flag of a failed decomposition, or None.
        inverse: With a square ``matrix``: the matrix or inverse paired with it, for the
            1-norm condition number; None: no condition reading.
        diagonal: The diagonal whose smallest magnitude is judged; None: no reading.
    """
    nan = torch.full((), float("nan"), dtype=torch.float64, device=matrix.device)
    zero = torch.zeros((), dtype=torch.float64, device=matrix.device)
    if matrix.numel():
        # One pass in the stored dtype, no float64 copy: aminmax propagates a NaN, and an
        # infinity is an extreme, so the largest magnitude is finite iff every entry is.
        low, high = torch.aminmax(matrix)
        extreme = torch.maximum(-low, high).to(torch.float64)
        finite = torch.isfinite(extreme)
        nonfinite = (~finite).to(torch.float64)
        amax = torch.where(finite, extreme, nan)  # the nonfinite reading decides then
    else:
        nonfinite, amax = zero, nan
    # |x| is exact in any dtype; the column sums accumulate in float64.
    kappa = nan if inverse is None else _norm_1(matrix) * _norm_1(inverse)
    return torch.stack(
        [
            nonfinite,
            nan if failed is None else failed.to(torch.float64),
            amax,
            nan if diagonal is None else diagonal.to(torch.float64).abs().amin(),
            kappa * torch.finfo(matrix.dtype).eps,
        ]
    )


def _norm_1(matrix: Tensor) -> Tensor:
    """``||M||_1``, the largest absolute column sum, as a float64 0-d tensor."""
    return matrix.abs().sum(0, dtype=torch.float64).amax()


def verdict(values: list[float], dtype: torch.dtype) -> tuple[str, float, float] | None:
    """The first bound a factor's `readings` cross in ``dtype``: (metric, value, bound)."""
    info = torch.finfo(dtype)
    nonfinite, failed, amax, min_diagonal, condition = values
    bounds = {
        "nonfinite": (nonfinite, 0.0),
        "failed": (failed, 0.0),
        "amax": (amax, info.max / 2.0**RANGE_BITS),
        "condition": (condition, CONDITION_BOUND),
    }
    for metric, (value, bound) in bounds.items():
        if value > bound:  # NaN (no reading) compares False
            return metric, value, bound
    if min_diagonal < info.tiny * 2.0**RANGE_BITS:
        return "min_diagonal", min_diagonal, info.tiny * 2.0**RANGE_BITS
    return None


class Escalation:
    """The per-factor dtypes of one optimizer under ``precision="auto"``, and its events.

    The optimizer provides ``_precision_readings(layer) -> {factor: (readings, dtype)}``
    and
    ``_promote(layer, factor, dtype, metric)``; `check` calls them.
    """

    def __init__(self) -> None:
        self.dtypes: dict[str, dict[str, torch.dtype]] = {}
        self.events: list[PrecisionEvent] = []

    def dtype(self, layer: str, factor: str, default: torch.dtype) -> torch.dtype:
        """The factor's current dtype (``default`` until it is promoted)."""
        return self.dtypes.get(layer, {}).get(factor, default)

    def check(self, optimizer: Any, layers: list[Any]) -> None:
        """Read every factor of ``layers`` once (one host read) and promote those due."""
        entries = [
            (layer, factor, reading, dtype)
            for layer in layers
            for factor, (reading, dtype) in optimizer._precision_readings(layer).items()
        ]
        if not entries:
            return
        device = entries[0][2].device
        values = torch.stack([entry[2].to(device) for entry in entries]).tolist()
        for (layer, factor, _, dtype), row in zip(entries, values, strict=True):
            crossed = verdict(row, dtype)
            if crossed is None or dtype not in WIDER:
                continue
            metric, value, bound = crossed
            wider = WIDER[dtype]
            self.dtypes.setdefault(layer.name, {})[factor] = wider
            optimizer._promote(layer, factor, wider, metric)
            self.events.append(
                PrecisionEvent(
                    step=optimizer.steps,
                    layer=layer.name,
                    factor=factor,
                    from_dtype=dtype_name(dtype),
                    to_dtype=dtype_name(wider),
                    metric=metric,
                    value=float(value),
                    bound=float(bound),
                )
            )

    def state_dict(self) -> dict[str, Any]:
        """Dtypes (torch names) and events, as plain Python values."""
        return {
            "dtypes": {
                layer: {k: dtype_name(d) for k, d in factors.items()}
                for layer, factors in self.dtypes.items()
            },
            "events": [asdict(event) for event in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` wrote."""
        self.dtypes = {
            layer: {k: getattr(torch, name) for k, name in factors.items()}
            for layer, factors in state["dtypes"].items()
        }
        self.events = [PrecisionEvent(**event) for event in state["events"]]
