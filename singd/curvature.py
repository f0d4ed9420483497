"""The read-only view of an optimizer's curvature that probes and reports consume.

Both `SINGD` and `KFAC` implement ``curvature_state() -> list[LayerCurvature]``. Readers
(probes, memory accounting, reports) use only this view, never private attributes, so
an optimizer's internals can change without breaking them.

Factor names:
    SINGD: ``K``, ``C`` (the structured inverse square-root factors), ``m_K``, ``m_C``
    (their Riemannian momenta, absent when ``alpha1 == 0``).
    KFAC: ``A``, ``G`` (the damped factors exactly as inverted) and ``A_inv``,
    ``G_inv`` (the stored inverses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from singd.structures.base import StructuredMatrix

Factor = StructuredMatrix | Tensor


@dataclass(frozen=True)
class LayerCurvature:
    """One layer's preconditioner state, as the optimizer holds it.

    Attributes:
        name: The layer's qualified name in the model (``model.named_modules()``).
        kind: ``"singd"`` or ``"kfac"``.
        factors: Named factors, structured matrices (SINGD) or dense tensors (KFAC),
            the live objects: readers must not modify them.
        damping: The damping as applied to each factor (KFAC: the value added to the
            diagonal of ``A`` and ``G`` before inversion; SINGD: lambda for both).
        counters: ``skipped_steps`` (GradScaler infs) and ``failed_decompositions``.
        gradient: The layer's current gradient as a ``d_C x d_K`` matrix
            ``[dW | db]`` (conv weights flattened), or None before the first backward.
        precondition: Maps a ``d_C x d_K`` gradient matrix to the preconditioned one,
            computed from the current state in the dtype of its argument (factors are
            cast to that dtype), so readers can recompute the update in float64.
        param_names: Qualified names of the parameters this layer's factors cover.
    """

    name: str
    kind: str
    factors: dict[str, Factor]
    damping: dict[str, float]
    counters: dict[str, int]
    gradient: Tensor | None
    precondition: Callable[[Tensor], Tensor]
    param_names: tuple[str, ...] = field(default=())
