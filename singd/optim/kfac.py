"""KFAC with explicit inversions, on the same machinery as SINGD.

KFAC (Martens & Grosse, ICML 2015) approximates a layer's Fisher block by ``A (x) G`` with
the input factor ``A = E[a a^T]`` (``d_K x d_K``) and the output-gradient factor
``G = E[g g^T]`` (``d_C x d_C``), where ``a`` and ``g`` are the rows that
`singd.optim.layers` makes for SINGD (same layers, ``expand``/``reduce``,
``loss_average`` scaling, GradScaler un-scaling): only the update differs from SINGD.

Factors, every ``T`` steps (on steps with ``steps % T == 0``), in ``factor_dtype``:

- batch estimates ``A_t = a^T a`` averaged over the backward passes since the last
  update and ``G_t = g^T g`` summed over them (gradient accumulation sums losses, so the
  Fisher of the summed loss is ``sum_p A_p (x) G_p``, about ``mean(A) (x) sum(G)``);
- exponential moving averages with ``factor_decay`` the weight of the old value,
  ``A <- factor_decay A + (1 - factor_decay) A_t`` (likewise ``G``); the first update
  takes the batch estimate itself (no bias towards zero);
- damping: factored Tikhonov damping (Martens & Grosse 2015, section 6.3) with
  ``pi = 1``: ``A_damped = A + sqrt(lambda) I`` and ``G_damped = G + sqrt(lambda) I``,
  so ``A_damped (x) G_damped = A (x) G + sqrt(lambda) (A (x) I + I (x) G) + lambda I``;
- inverses ``A_inv = A_damped^-1``, ``G_inv = G_damped^-1`` by ``inverse_method``
  (`singd.optim.inverses`): LAPACK in ``inverse_dtype`` then cast to ``factor_dtype``
  (an inverse beyond the dtype's range is stored as inf), or Newton-Schulz entirely in
  ``factor_dtype``. A failed inversion keeps the previous inverse (the identity before
  the first), is counted in ``failed_decompositions`` (one per factor and update) and
  saved to ``failure_dir``. A factor that overflowed stays non-finite (a moving average
  does not recover from inf), so each later inversion of it fails too and the last good
  inverse stays in use: the counter keeps growing, which is how the probes see it.
  With the default ``on_failure="keep"``, no ``failure_dir`` and a LAPACK method, the
  verdict, the choice of inverse (``torch.where``) and the count stay on the device, so
  a step never waits for it (`singd.optim.inverses.invert_or_keep_on_device`); the count
  is read at the probes' cadence (`curvature_state`) or on request
  (`failed_decompositions`). Reproducers and ``"raise"`` need the verdict on the host at
  once, and Newton-Schulz's iteration count depends on its residuals: those read it.

With ``precision="auto"`` (`singd.optim.precision`) each of ``A``, ``G``, ``A_inv``,
``G_inv`` has a dtype of its own, ``factor_dtype`` at first: a statistic promoted also
forms its rows ``a`` (or ``g``) in the wider dtype; a promoted side is inverted again at
once, in the inverse's dtype, so the step that found the problem already uses the
widened inverse. The preconditioning product is computed in the wider dtype of the two
inverses.

Parameter update with the gradient ``Grad = [dW | db]`` (``d_C x d_K``), computed in
``factor_dtype`` and cast back: the natural gradient ``nat = G_inv Grad A_inv``, then,
as SINGD, ``step = nat + gamma p``, ``buf = momentum buf + step``, ``p <- p - lr buf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from singd.curvature import KFAC_ROLES, LayerCurvature
from singd.optim.base import KroneckerOptimizer
from singd.optim.coverage import DEFAULT_FALLBACK, FallbackFactory
from singd.optim.inverses import (
    DEVICE_METHODS,
    INVERSE_DTYPES,
    INVERSE_METHODS,
    ON_FAILURE,
    invert_or_keep,
    invert_or_keep_on_device,
)
from singd.optim.layers import KroneckerLayer
from singd.optim.precision import readings
from singd.optim.scaling import not_one
from singd.optim.validation import check_number, group_location


class KFAC(KroneckerOptimizer):
    """KFAC with Cholesky, eigendecomposition, LU or Newton-Schulz inverses.

    Args:
        model: The model (bare or wrapped in ``DistributedDataParallel``).
        params: ``None`` (every trainable parameter; those of unsupported layers go to
            the fallback optimizer), tensors, or parameter groups. Every argument from
            ``lr`` to ``loss_average`` can be set per group; a layer's weight and bias
            must share a group.
        lr: Learning rate of the parameters.
        momentum: Heavy-ball momentum of the parameter update, in [0, 1).
        damping: lambda; ``sqrt(lambda)`` is added to the diagonals of ``A`` and ``G``.
        weight_decay: gamma, added to the preconditioned gradient.
        T: Update period of factors and inverses (steps with ``steps % T == 0``).
        factor_decay: Weight of the old value in the factors' moving averages, in [0, 1).
        inverse_method: ``"cholesky"``, ``"eigh"``, ``"inv"`` or ``"newton-schulz"``.
        factor_dtype: dtype of ``A``, ``G``, their inverses and the preconditioning
            products; None: the weight's dtype.
        inverse_dtype: Compute dtype of the LAPACK methods, ``torch.float32`` or
            ``torch.float64``; None: float32 for float16/bfloat16 factors, else the
            factor dtype (Newton-Schulz always computes in ``factor_dtype``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing (conv, sequences).
        loss_average: ``"batch"``, ``"batch+sequence"`` or ``None`` (a summed loss).
        on_failure: ``"keep"`` (keep the previous inverse and count the failure) or
            ``"raise"`` (raise `singd.optim.inverses.InversionError`).
        failure_dir: Directory for reproducers of failed inversions (``.pt`` files named
            ``LAYER.FACTOR.stepN.METHOD.pt``, see `singd.optim.inverses`; replay one with
            ``python -m singd.optim.replay FILE.pt``); None: none are saved.
        fallback: Optimizer for parameters no factor covers (see `KroneckerOptimizer`).
        warn_unsupported: With ``fallback=None``, warn about untrained parameters.
        init_grad_scale: First GradScaler scale (or a number of its magnitude).
        precision: ``None`` or ``"auto"`` (see `KroneckerOptimizer`).

    Raises:
        ValueError: A bad hyperparameter, dtype or model, named in one sentence.
    """

    ACCUMULATORS = {"A_batch": "input", "G_batch": "output"}
    BYTE_CATEGORIES = {"A": "factors", "G": "factors", "A_inv": "inverses", "G_inv": "inverses"}
    CURVATURE_FACTORS = ("A", "G")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        weight_decay: float = 0.0,
        T: int = 10,
        factor_decay: float = 0.95,
        inverse_method: str = "cholesky",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        on_failure: str = "keep",
        failure_dir: str | Path | None = None,
        fallback: str | FallbackFactory | None = DEFAULT_FALLBACK,
        warn_unsupported: bool = True,
        init_grad_scale: float = 1.0,
        precision: str | None = None,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be 'keep' or 'raise', got {on_failure!r}.")
        if failure_dir is not None and not isinstance(failure_dir, str | Path):
            raise ValueError(f"failure_dir must be a path or None, got {failure_dir!r}.")
        self.on_failure = on_failure
        self.failure_dir = failure_dir
        # Failure counts per layer, 0-d tensors on the layer's device (read on request).
        self._failures: dict[str, Tensor] = {}
        self._damping_used: dict[str, float] = {}
        # Under precision="auto": each inversion's verdict of the last update (0-d bool
        # tensors), one of the escalation's readings.
        self._failed: dict[str, dict[str, Tensor]] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            T=T,
            factor_decay=factor_decay,
            inverse_method=inverse_method,
            factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype,
            kfac_approx=kfac_approx,
            loss_average=loss_average,
        )
        super().__init__(
            model,
            params,
            defaults,
            fallback=fallback,
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
            precision=precision,
        )

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        where = group_location(index, len(self.param_groups))
        check_number(group["damping"], f"damping{where}")
        check_number(group["factor_decay"], f"factor_decay{where}", high=1.0)
        if group["inverse_method"] not in INVERSE_METHODS:
            raise ValueError(
                f"inverse_method{where} must be one of {', '.join(INVERSE_METHODS)}, "
                f"got {group['inverse_method']!r}."
            )
        dtype = group["factor_dtype"]
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"factor_dtype{where} must be a floating torch dtype or None, got {dtype!r}."
            )
        if group["inverse_dtype"] is not None and group["inverse_dtype"] not in INVERSE_DTYPES:
            raise ValueError(
                f"inverse_dtype{where} must be torch.float32, torch.float64 or None (torch."
                f"linalg has no float16/bfloat16 kernels), got {group['inverse_dtype']!r}."
            )

    def _configured_dtypes(self, layer: KroneckerLayer) -> tuple[torch.dtype, torch.dtype]:
        """Rows ``a`` and ``g`` in ``factor_dtype``, so the Gram matrices are formed there."""
        dtype = self.param_groups[layer.group_index]["factor_dtype"] or self._weight_dtype(layer)
        return dtype, dtype

    def _inverse_of(self, layer: KroneckerLayer, key: str) -> torch.dtype:
        """The dtype the inverse of ``key`` is stored in (``A``'s own, until promoted)."""
        own = self._factors[layer.name][key].dtype
        if self._escalation is None:
            return own
        return self._escalation.dtype(layer.name, f"{key}_inv", own)

    # -------------------------------------------------------------- the update
    def _init_layer(self, layer: KroneckerLayer) -> None:
        # A, G and their inverses appear at the first update; until then the layer takes
        # plain gradient steps.
        self._failures[layer.name] = torch.zeros(
            (), dtype=torch.int64, device=layer.module.weight.device
        )

    def _input_statistic(self, layer: KroneckerLayer, a: Tensor) -> Tensor:
        return a.T @ a

    def _input_statistic_entries(self, layer: KroneckerLayer) -> int:
        return layer.dim_K**2

    def _accumulate(self, layer: KroneckerLayer, aTa: Tensor, g: Tensor) -> None:
        state = self._factors[layer.name]
        if "A_batch" in state:
            state["A_batch"].add_(aTa)
            state["G_batch"].addmm_(g.T, g)
        else:
            state["A_batch"], state["G_batch"] = aTa, g.T @ g

    def _update_preconditioner(self, layer: KroneckerLayer, grad_unscaling) -> None:
        group = self.param_groups[layer.group_index]
        state = self._factors[layer.name]
        A_batch = state.pop("A_batch").div_(max(layer.passes, 1))
        G_batch = state.pop("G_batch")
        if not_one(grad_unscaling):
            G_batch.mul_(grad_unscaling)
        decay = group["factor_decay"]
        for key, batch in (("A", A_batch), ("G", G_batch)):
            if key in state:
                state[key].mul_(decay).add_(batch, alpha=1.0 - decay)
            else:
                state[key] = batch
        shift = math.sqrt(group["damping"])
        self._damping_used[layer.name] = shift
        for key in ("A", "G"):
            self._invert(layer, key)

    def _invert(self, layer: KroneckerLayer, key: str) -> None:
        """Invert the damped statistic ``key`` into ``{key}_inv`` (or keep the previous)."""
        group = self.param_groups[layer.group_index]
        state = self._factors[layer.name]
        target = self._inverse_of(layer, key)
        inverse_dtype = group["inverse_dtype"] or torch.promote_types(target, torch.float32)
        if self._escalation is not None:
            # A promoted inverse (float64) computes in its own dtype at least.
            inverse_dtype = torch.promote_types(inverse_dtype, target)
        # Decided on the device where nothing needs the verdict at once: no reproducer
        # to write, nothing to raise, and a method whose work does not depend on it.
        on_device = (
            self.on_failure == "keep"
            and self.failure_dir is None
            and group["inverse_method"] in DEVICE_METHODS
        )
        damped = _damped(state[key], self._damping_used[layer.name]).to(target)
        previous = state.get(f"{key}_inv")
        if previous is not None:
            previous = previous.to(target)
        if on_device:
            inverse, failed = invert_or_keep_on_device(
                damped, previous, group["inverse_method"], inverse_dtype=inverse_dtype
            )
        else:
            inverse, error = invert_or_keep(
                damped,
                previous,
                group["inverse_method"],
                inverse_dtype=inverse_dtype,
                on_failure=self.on_failure,
                failure_dir=self.failure_dir,
                tag=f"{layer.name}.{key}.step{self.steps}",
            )
            failed = error is not None
        self._failures[layer.name] += failed
        if self._escalation is not None:  # the verdict is one of its readings
            self._failed.setdefault(layer.name, {})[key] = torch.as_tensor(
                failed, device=damped.device
            )
        state[f"{key}_inv"] = inverse

    # ---------------------------------------------------- precision="auto"
    def _precision_readings(self, layer: KroneckerLayer) -> dict[str, tuple[Tensor, torch.dtype]]:
        """``A``, ``G`` (damped, as inverted) and their inverses: range, finiteness, the
        inversion's verdict (statistics), the diagonal (statistics) and ``kappa_1 eps``."""
        state = self._factors[layer.name]
        shift = self._damping_used[layer.name]
        found = {}
        for key in ("A", "G"):
            if key not in state:  # restarted after it went non-finite
                continue
            damped, inverse = _damped(state[key], shift), state[f"{key}_inv"]
            failed = self._failed[layer.name][key]
            found[key] = (
                readings(damped, failed=failed, inverse=inverse, diagonal=damped.diagonal()),
                damped.dtype,
            )
            found[f"{key}_inv"] = (readings(inverse, inverse=damped), inverse.dtype)
        return found

    def _promote(self, layer: KroneckerLayer, factor: str, dtype: torch.dtype, why: str) -> None:
        """Widen a statistic or an inverse and invert that side again at once.

        A statistic that is no longer finite is dropped: its moving average restarts at
        the next update, and the last good inverse (kept by the inversion) serves until
        then.
        """
        state = self._factors[layer.name]
        key = factor.removesuffix("_inv")
        if factor == key and why == "nonfinite":
            del state[key]
            return
        state[factor] = state[factor].to(dtype)
        if key in state:
            self._invert(layer, key)

    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        state = self._factors[layer.name]
        if "A_inv" not in state:
            return grad
        return _natural_gradient(state["A_inv"], state["G_inv"], grad)

    # ------------------------------------------------------------ read-only view
    def curvature_state(self) -> list[LayerCurvature]:
        """Each layer's factors, damping and counters (empty factors before the first update).

        Factors: ``A`` and ``G`` damped exactly as inverted (recomputed as ``A + s I`` in
        ``factor_dtype`` with the shift ``s`` of the last inversion, the same operation),
        and the live inverses ``A_inv``, ``G_inv``. ``damping`` is that shift
        ``sqrt(lambda)`` per factor. ``precondition`` maps a ``d_C x d_K`` matrix to
        ``G_inv M A_inv`` in the matrix's dtype.
        """
        views = []
        for layer in filter(self.owns, self._layers):  # sharded state: this rank's layers
            state = self._factors[layer.name]
            shift = self._damping_used.get(layer.name)
            factors: dict[str, Tensor] = {}
            if "A_inv" in state:
                factors = {
                    key: _damped(state[key], shift) if key in ("A", "G") else state[key]
                    for key in ("A", "G", "A_inv", "G_inv")
                    if key in state
                }
            grad = self._gradient_matrix(layer)
            views.append(
                LayerCurvature(
                    name=layer.name,
                    kind="kfac",
                    factors=factors,
                    damping={} if shift is None else {"A": shift, "G": shift},
                    counters={
                        "skipped_steps": layer.skipped_steps,
                        "failed_decompositions": int(self._failures[layer.name]),
                    },
                    gradient=grad,
                    precondition=_cast_preconditioner(state.get("A_inv"), state.get("G_inv")),
                    param_names=layer.param_names,
                    roles={k: KFAC_ROLES[k] for k in factors},
                )
            )
        return views

    @property
    def failed_decompositions(self) -> int:
        """Failed inversions over all layers and factors since construction (a host read:
        the counts live on the device)."""
        return sum(int(count) for count in self._failures.values())

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The base state plus, per layer, the failure count and the damping last applied."""
        state = super().state_dict()
        state["kfac"] = {
            "failed_decompositions": {name: int(n) for name, n in self._failures.items()},
            "damping_used": dict(self._damping_used),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict` (checked first, as the base class says)."""
        super().load_state_dict(state_dict)
        saved = state_dict["kfac"]
        for name, count in self._failures.items():
            count.fill_(saved["failed_decompositions"].get(name, 0))
        self._damping_used = {
            name: value for name, value in saved["damping_used"].items() if name in self._failures
        }


def _damped(factor: Tensor, shift: float) -> Tensor:
    """``factor + shift I``, in the factor's dtype (a new tensor)."""
    damped = factor.clone()
    damped.diagonal().add_(shift)
    return damped


def _natural_gradient(A_inv: Tensor, G_inv: Tensor, grad: Tensor) -> Tensor:
    """``G_inv Grad A_inv`` in the inverses' (wider) dtype, returned in ``Grad``'s."""
    dtype = torch.promote_types(A_inv.dtype, G_inv.dtype)
    return (G_inv.to(dtype) @ grad.to(dtype) @ A_inv.to(dtype)).to(grad.dtype)


def _cast_preconditioner(A_inv: Tensor | None, G_inv: Tensor | None) -> Callable[[Tensor], Tensor]:
    def precondition(grad: Tensor) -> Tensor:
        if A_inv is None or G_inv is None:
            return grad.clone()
        return _natural_gradient(A_inv.to(grad.dtype), G_inv.to(grad.dtype), grad)

    return precondition
