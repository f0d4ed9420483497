"""The read-only view of an optimizer's curvature that probes and reports consume.

Both `SINGD` and `KFAC` implement ``curvature_state() -> list[LayerCurvature]``. Readers
(probes, memory accounting, reports) use only this view, never private attributes, so
an optimizer's internals can change without breaking them.

Each factor has a name and a `FactorRole`, so readers need not know either optimizer's
names: its side (``input``: acts on the ``d_K`` side of the gradient matrix; ``output``:
the ``d_C`` side) and its kind:

- ``preconditioner``: a factor ``S`` whose ``S S^T`` is the preconditioner's Kronecker
  factor (SINGD's ``K``, ``C``, structured inverse square roots);
- ``statistic``: a curvature estimate the optimizer inverts (KFAC's ``A``, ``G``, damped,
  exactly as inverted);
- ``inverse``: the stored inverse of the statistic on the same side (KFAC's ``A_inv``,
  ``G_inv``);
- ``momentum``: a factor's momentum (SINGD's ``m_K``, ``m_C``, absent when
  ``alpha1 == 0``).

The names stay available as the factors' keys (`SINGD_ROLES`, `KFAC_ROLES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from singd.structures.base import StructuredMatrix

Factor = StructuredMatrix | Tensor
Side = Literal["input", "output"]
Kind = Literal["preconditioner", "statistic", "inverse", "momentum"]


@dataclass(frozen=True)
class FactorRole:
    """What a factor is: its ``side`` of the Kronecker product and its ``kind``."""

    side: Side
    kind: Kind


SINGD_ROLES: dict[str, FactorRole] = {
    "K": FactorRole("input", "preconditioner"),
    "C": FactorRole("output", "preconditioner"),
    "m_K": FactorRole("input", "momentum"),
    "m_C": FactorRole("output", "momentum"),
}
KFAC_ROLES: dict[str, FactorRole] = {
    "A": FactorRole("input", "statistic"),
    "G": FactorRole("output", "statistic"),
    "A_inv": FactorRole("input", "inverse"),
    "G_inv": FactorRole("output", "inverse"),
}


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
        roles: The `FactorRole` of each factor in ``factors``.
    """

    name: str
    kind: str
    factors: dict[str, Factor]
    damping: dict[str, float]
    counters: dict[str, int]
    gradient: Tensor | None
    precondition: Callable[[Tensor], Tensor]
    param_names: tuple[str, ...] = field(default=())
    roles: dict[str, FactorRole] = field(default_factory=dict)

    def named(self, kind: Kind, side: Side | None = None) -> dict[str, Factor]:
        """The factors of one ``kind`` (on one ``side``, if given), by name."""
        return {
            name: factor
            for name, factor in self.factors.items()
            if self.roles[name].kind == kind and side in (None, self.roles[name].side)
        }
