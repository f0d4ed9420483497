"""SINGD: structured inverse-free natural gradient descent (Lin et al., ICML 2024).

Every supported layer keeps two structured factors, ``K`` (``d_K x d_K``, input side)
and ``C`` (``d_C x d_C``, output side), whose products ``K K^T`` and ``C C^T`` approximate
the inverses of the Kronecker factors of the (empirical) Fisher, and updates them
without any matrix inversion (the paper's SINGD update); ``I`` below is the identity
and ``avg(M) = trace(M) / dim``.

Curvature terms, from the rows ``a`` and ``g`` of `singd.optim.layers`, every T steps:
``H_K = P_K(K^T a^T a K)``, ``H_C = P_C(C^T g^T g C)`` (P projects onto the structure).
Over n backward passes before a step (gradient accumulation), ``H_K`` is their mean
(each pass's ``a`` is already normalised by its rows) and ``H_C`` their sum, times n for
a mean loss (the user divides each pass's mean loss by n), so n passes over parts of a
batch give the curvature of one pass over the whole batch. With n = 1 this is the
published package's update; SINGD's ``avg(H_C) H_K`` is unchanged by the rescaling for
a mean loss, IKFAC's is not. A layer run r times in one forward (shared weights) adds r
calls to one pass, counted apart from the passes (by the autograd engine's graph task):
its calls are rows of one batch, as ``kfac_approx="expand"`` treats a shared dimension,
so ``H_K`` is averaged over all calls and ``H_C`` rescaled by the passes alone.

Preconditioner update (``c = 0.5 (1 - alpha1)`` with ``normalize_lr_cov``, else 0.5):

- SINGD: ``m_K' = c (avg(H_C) H_K + lambda avg(C^T C) K^T K - I)``,
  ``m_C' = c (avg(H_K) H_C + lambda avg(K^T K) C^T C - I)``
  (the projections ``P(K^T K)``, ``P(C^T C)`` are used for the damping terms);
- IKFAC (``kfac_like=True``): ``m_K' = c (H_K + lambda K^T K - I)``,
  ``m_C' = c (H_C + lambda C^T C - I)``; Riemannian momentum is off (alpha1 = 0);
- Riemannian momentum ``m_K = m_K' + alpha1 m_K`` (no buffers at all when alpha1 = 0);
- ``K <- K (I - beta1 m_K)``, ``C <- C (I - beta1 m_C)``: the first-order truncation of
  ``K exp(-beta1 m_K)``, which keeps ``K`` in its structure's group. With
  ``normalize_lr_cov``, ``beta1`` is divided by ``max(1, max |entry of m|)``.

Parameter update, with ``G = [dW | db]`` (``d_C x d_K``): the natural gradient
``C C^T G K K^T`` is computed in the preconditioner dtypes and cast back, then
``step = nat + gamma p``, ``buf = alpha2 buf + step``, ``p <- p - beta2 buf``. For a
dense linear layer with fewer rows than it is wide, ``G`` is the product of the rows the
curvature used, and ``nat`` comes from them at a fraction of the FLOPs where ``.grad`` is
provably that product (`singd.optim.lowrank`, which lists the checks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from singd.curvature import SINGD_ROLES, LayerCurvature
from singd.optim import foreach, lowrank
from singd.optim.accounting import ACCUMULATORS
from singd.optim.base import KroneckerOptimizer
from singd.optim.coverage import DEFAULT_FALLBACK, FallbackFactory
from singd.optim.functional import singd_factor_update, singd_natural_gradient
from singd.optim.layers import (
    KroneckerLayer,
    input_rows,
    layer_dims,
    loss_terms,
    output_rows,
    process_input,
    split_matrix,
)
from singd.optim.precision import readings
from singd.optim.validation import check_number, group_location
from singd.optim.views import FactorView
from singd.structures import StructuredMatrix, get_structure
from singd.structures.diagonal import DiagonalMatrix


class SINGD(KroneckerOptimizer):
    """Structured inverse-free natural gradient descent; IKFAC and INGD are settings.

    Drop-in for ``singd.optim.optimizer.SINGD`` of the PyPI package ``singd`` 0.0.5:
    same argument names, defaults and parameter-group behaviour. INGD is
    ``structures=("dense", "dense")``; IKFAC is ``kfac_like=True``.

    Args:
        model: The model (bare or wrapped in ``DistributedDataParallel``).
        params: ``None`` (every trainable parameter; those of unsupported layers go to
            the fallback optimizer), tensors, or parameter groups. Every argument
            from ``lr`` to ``normalize_lr_cov`` below can be set per group; a layer's
            weight and bias must share a group.
        lr: beta2, learning rate of the parameters.
        momentum: alpha2, heavy-ball momentum of the parameter update, in [0, 1).
        damping: lambda, damping of the preconditioner update (>= 0).
        alpha1: Riemannian momentum of ``m_K``, ``m_C``, in [0, 1).
        weight_decay: gamma, added to the preconditioned gradient.
        T: Preconditioner update period: curvature terms are collected and the
            factors updated on steps with ``steps % T == 0``.
        loss_average: ``"batch"`` (mean over the batch), ``"batch+sequence"`` (mean over
            batch and shared positions) or ``None`` (a summed loss).
        lr_cov: beta1, learning rate of ``K`` and ``C``; a number or a schedule
            ``step -> float``. A schedule is not saved in `state_dict` (pass it again
            before `load_state_dict`, as with LR schedulers).
        structures: Structure names of ``(K, C)``: ``dense``, ``diagonal``,
            ``block{N}diagonal``, ``hierarchical{K1}_{K2}``, ``triltoeplitz``,
            ``triutoeplitz``, ... (`singd.structures.get_structure`).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing (conv, sequences).
        warn_unsupported: With ``fallback=None``, warn about untrained parameters.
        kfac_like: IKFAC update; sets alpha1 to 0 with a warning.
        preconditioner_dtype: dtypes of ``(K, m_K)`` and ``(C, m_C)``; None: the
            weight's dtype.
        init_grad_scale: First GradScaler scale (or a number of its magnitude).
        normalize_lr_cov: Normalised gradient descent on ``K``, ``C`` (see module doc).
        fallback: Optimizer for parameters no factor covers; see `KroneckerOptimizer`
            (default AdamW with each group's lr and weight decay; None: untrained).
        precision: ``None`` or ``"auto"``: ``K`` (with ``m_K``) and ``C`` (with
            ``m_C``) each widened when near their dtype's limits
            (`singd.optim.precision`; `precision_events` lists the changes).

    Raises:
        ValueError: A bad hyperparameter, structure name, dtype or model, named in one
            sentence.
    """

    ACCUMULATORS = {"H_K": "input", "H_C": "output"}
    BYTE_CATEGORIES = {"K": "factors", "C": "factors", "m_K": "momenta", "m_C": "momenta"}
    CURVATURE_FACTORS = ("K", "C")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        fallback: str | FallbackFactory | None = DEFAULT_FALLBACK,
        precision: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=alpha1,
            weight_decay=weight_decay,
            T=T,
            loss_average=loss_average,
            lr_cov=lr_cov,
            structures=structures,
            kfac_approx=kfac_approx,
            kfac_like=kfac_like,
            preconditioner_dtype=preconditioner_dtype,
            normalize_lr_cov=normalize_lr_cov,
        )
        # The batched diagonal step's factor squares and parameters (`singd.optim.foreach`).
        self._diagonal_parts: foreach.DiagonalParts | None = None
        super().__init__(
            model,
            params,
            defaults,
            fallback=fallback,
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
            precision=precision,
        )
        # Dense layers' rows kept for the low-rank natural gradient (`singd.optim.lowrank`).
        self._low_rank = lowrank.LowRank(self, self._module)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        where = group_location(index, len(self.param_groups))
        check_number(group["damping"], f"damping{where}")
        check_number(group["alpha1"], f"alpha1{where}", high=1.0)
        if not callable(group["lr_cov"]):
            check_number(group["lr_cov"], f"lr_cov{where}")
        for key in ("kfac_like", "normalize_lr_cov"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{key}{where} must be True or False, got {group[key]!r}.")
        structures = group["structures"]
        if not (isinstance(structures, (tuple, list)) and len(structures) == 2):
            raise ValueError(
                f"structures{where} must be a pair of names (K, C) such as "
                f"('dense', 'diagonal'), got {structures!r}."
            )
        for name in structures:
            get_structure(name)  # raises ValueError listing the valid forms
        group["structures"] = tuple(structures)
        dtypes = group["preconditioner_dtype"]
        pair = isinstance(dtypes, (tuple, list)) and len(dtypes) == 2
        if not pair or not all(
            d is None or (isinstance(d, torch.dtype) and d.is_floating_point) for d in dtypes
        ):
            raise ValueError(
                f"preconditioner_dtype{where} must be a pair of floating torch dtypes or "
                f"None such as (torch.float32, None), got {dtypes!r}."
            )
        group["preconditioner_dtype"] = tuple(dtypes)
        if group["kfac_like"] and group["alpha1"] != 0.0:
            warnings.warn(
                f"kfac_like=True{where} uses no Riemannian momentum; alpha1="
                f"{group['alpha1']} is set to 0.",
                stacklevel=5,
            )
            group["alpha1"] = 0.0

    # -------------------------------------------------------------- the update
    def _init_layer(self, layer: KroneckerLayer) -> None:
        group = self.param_groups[layer.group_index]
        K_cls, C_cls = (get_structure(name) for name in group["structures"])
        dtype_K, dtype_C = self._curvature_dtypes(layer)
        device = layer.module.weight.device
        state = self._factors[layer.name]
        state["K"] = K_cls.eye(layer.dim_K, dtype=dtype_K, device=device)
        state["C"] = C_cls.eye(layer.dim_C, dtype=dtype_C, device=device)
        if group["alpha1"] != 0.0:
            state["m_K"] = K_cls.zeros(layer.dim_K, dtype=dtype_K, device=device)
            state["m_C"] = C_cls.zeros(layer.dim_C, dtype=dtype_C, device=device)

    def _reduce_input(self, layer: KroneckerLayer, x: Tensor) -> StructuredMatrix:
        K = self._factors[layer.name]["K"]
        if isinstance(K, DiagonalMatrix):
            # Without the copy of the input that appends the bias's ones column.
            kfac_approx = self.param_groups[layer.group_index]["kfac_approx"]
            rows = input_rows(x if x.dtype == K.dtype else x.to(K.dtype), layer, kfac_approx)
            return K.from_input_rows(rows, layer.has_bias)
        group = self.param_groups[layer.group_index]
        a = process_input(x.to(self._curvature_dtypes(layer)[0]), layer, group["kfac_approx"])
        self._low_rank.offer_input(layer, x, a)
        return self._input_statistic(layer, a)

    def _input_statistic(self, layer: KroneckerLayer, a: Tensor) -> StructuredMatrix:
        return self._factors[layer.name]["K"].from_inner(a.T)

    def _input_statistic_entries(self, layer: KroneckerLayer) -> int:
        return type(self._factors[layer.name]["K"]).storage_entries(layer.dim_K)

    def _reduce_output(self, layer: KroneckerLayer, grad: Tensor) -> StructuredMatrix:
        C = self._factors[layer.name]["C"]
        if isinstance(C, DiagonalMatrix):
            # Without the copies of the rows scaled by sqrt(loss terms / s_{t-1}).
            group = self.param_groups[layer.group_index]
            g = grad if grad.dtype == C.dtype else grad.to(C.dtype)
            rows = output_rows(g, layer, group["kfac_approx"])
            terms = loss_terms(grad, layer, group["loss_average"])
            return C.from_output_rows(rows, terms / self._grad_scales[self.steps - 1])
        self._low_rank.offer_output(layer, grad)
        return C.from_inner(super()._reduce_output(layer, grad).T)

    def _accumulate(
        self, layer: KroneckerLayer, H_K: StructuredMatrix, H_C: StructuredMatrix
    ) -> None:
        state = self._factors[layer.name]
        if "H_K" in state:
            state["H_K"].add_(H_K)
            state["H_C"].add_(H_C)
        else:
            state["H_K"], state["H_C"] = H_K, H_C

    def _update_preconditioner(self, layer: KroneckerLayer, grad_unscaling) -> None:
        group = self.param_groups[layer.group_index]
        state = self._factors[layer.name]
        # Over n accumulated passes the sums are n * mean (input side) and, for a mean
        # loss divided by n, (1/n) * whole-batch (output side): rescale both to the
        # whole batch. A layer run r times per forward adds r calls to one pass: its
        # calls are rows of one batch ("expand"), averaged on the input side and summed,
        # not rescaled, on the output side. (For SINGD with one call per pass the
        # factors cancel in avg(H_C) H_K; IKFAC needs them.)
        passes = max(layer.backward_passes, 1)
        beta1 = group["lr_cov"]
        alpha1 = group["alpha1"]
        updated = singd_factor_update(
            state["K"],
            state["C"],
            state.get("m_K"),
            state.get("m_C"),
            state.pop("H_K"),
            state.pop("H_C"),
            lr_cov=float(beta1(self.steps)) if callable(beta1) else beta1,
            alpha1=alpha1,
            damping=group["damping"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
            scale_K=1.0 / max(layer.passes, 1),
            scale_C=grad_unscaling * (passes if group["loss_average"] is not None else 1.0),
        )
        if alpha1 != 0.0:  # no momentum buffers at all otherwise
            state["m_K"], state["m_C"] = updated.m_K, updated.m_C

    # ---------------------------------------------------- precision="auto"
    def _precision_readings(self, layer: KroneckerLayer) -> dict[str, tuple[Tensor, torch.dtype]]:
        """``K`` and ``C``, each with its momentum: range, finiteness and the smallest
        diagonal entry of the factor (no condition reading: SINGD stores no inverse)."""
        state = self._factors[layer.name]
        found = {}
        for key in ("K", "C"):
            factor = state[key]
            stored = [*factor.tensors().values()]
            if f"m_{key}" in state:
                stored += state[f"m_{key}"].tensors().values()
            flat = torch.cat([t.flatten() for t in stored])
            found[key] = (readings(flat, diagonal=factor.diagonal()), factor.dtype)
        return found

    def _promote(self, layer: KroneckerLayer, factor: str, dtype: torch.dtype, why: str) -> None:
        """Widen ``K`` or ``C`` with its momentum (they share a dtype); a factor that is no
        longer finite restarts at the identity, its momentum at zero."""
        state = self._factors[layer.name]
        momentum = f"m_{factor}"
        if why == "nonfinite":
            cls, dim = type(state[factor]), state[factor].dim
            device = layer.module.weight.device
            state[factor] = cls.eye(dim, dtype=dtype, device=device)
            if momentum in state:
                state[momentum] = cls.zeros(dim, dtype=dtype, device=device)
            return
        state[factor] = state[factor].to(dtype=dtype)
        if momentum in state:
            state[momentum] = state[momentum].to(dtype=dtype)

    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        state = self._factors[layer.name]
        return singd_natural_gradient(state["K"], state["C"], grad)

    def _update_preconditioners(self, layers: list[KroneckerLayer], grad_unscaling) -> None:
        if foreach.applies(self, layers):
            foreach.diagonal_factor_update(self, layers, grad_unscaling)
        else:
            super()._update_preconditioners(layers, grad_unscaling)

    def _batched_step(self, active: list[KroneckerLayer], divisor) -> bool:
        if not foreach.applies(self, active):
            return False
        foreach.diagonal_step(self, active, divisor)
        return True

    def _layer_directions(self, layer: KroneckerLayer, divisor, factor: float) -> list[Tensor]:
        if foreach.two_diagonal_factors(self, layer):  # no copy into [dW | db]
            return foreach.diagonal_directions(self, [layer], divisor, factor)
        nat = self._low_rank.natural_gradient(layer, divisor, factor)
        if nat is not None:  # from the rows: no copy into [dW | db] either
            return split_matrix(layer, nat)
        return super()._layer_directions(layer, divisor, factor)

    def _step_layers(self) -> None:
        try:
            super()._step_layers()
        finally:
            self._low_rank.drop()  # rows live from one backward pass to its step

    def _clear_accumulators(self, layer: KroneckerLayer) -> None:
        super()._clear_accumulators(layer)
        self._low_rank.drop(layer)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._low_rank.remove_hooks()

    def state_bytes(self, total: bool = False) -> dict[str, int]:
        counts = super().state_bytes(total)
        counts[ACCUMULATORS] += self._low_rank.nbytes()  # rows waiting for the step
        return counts

    # ------------------------------------------------------------ read-only view
    def curvature_state(self) -> list[LayerCurvature]:
        """Each layer's factors (live objects: do not modify), damping and counters.

        Factors: ``K``, ``C`` and, when alpha1 != 0, ``m_K``, ``m_C``. ``precondition``
        maps a ``d_C x d_K`` matrix to ``C C^T G K K^T`` in the matrix's dtype.
        """
        views = []
        for layer in filter(self.owns, self._layers):  # sharded state: this rank's layers
            state = self._factors[layer.name]
            damping = self.param_groups[layer.group_index]["damping"]
            factors = {k: state[k] for k in ("K", "C", "m_K", "m_C") if k in state}
            views.append(
                LayerCurvature(
                    name=layer.name,
                    kind="singd",
                    factors=factors,
                    damping={"K": damping, "C": damping},
                    counters={"skipped_steps": layer.skipped_steps, "failed_decompositions": 0},
                    gradient=self._gradient_matrix(layer),
                    precondition=_cast_preconditioner(state["K"], state["C"]),
                    param_names=layer.param_names,
                    roles={k: SINGD_ROLES[k] for k in factors},
                )
            )
        return views

    # -------------------------------------- the published singd 0.0.5 attribute names
    SUPPORTED_STRUCTURES: Mapping[str, type[StructuredMatrix]] = MappingProxyType(
        {
            name: get_structure(name)
            for name in (
                "dense",
                "diagonal",
                "block30diagonal",
                "hierarchical15_15",
                "triltoeplitz",
                "triutoeplitz",
            )
        }
    )
    """The published package's structure names and classes (read-only). Every name
    `singd.structures.get_structure` parses works here too (``block{N}diagonal``, ...)."""

    @property
    def module_names(self) -> dict[nn.Module, str]:
        """Each optimized layer (module) and its name in the model, in model order."""
        return {layer.module: layer.name for layer in self._layers}

    @property
    def Ks(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``K`` (a read-only view of the live state)."""
        return FactorView(self, "K")

    @property
    def Cs(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``C`` (a read-only view of the live state)."""
        return FactorView(self, "C")

    @property
    def m_Ks(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``m_K``; empty when alpha1 = 0 (no momentum is kept)."""
        return FactorView(self, "m_K")

    @property
    def m_Cs(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``m_C``; empty when alpha1 = 0 (no momentum is kept)."""
        return FactorView(self, "m_C")

    @property
    def H_Ks(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``H_K`` accumulated since the last preconditioner update."""
        return FactorView(self, "H_K")

    @property
    def H_Cs(self) -> Mapping[str, StructuredMatrix]:
        """Layer name -> ``H_C`` accumulated since the last preconditioner update."""
        return FactorView(self, "H_C")

    @staticmethod
    def preconditioner_dims(module: nn.Module) -> tuple[int, int]:
        """``(dim_K, dim_C)`` of a Linear or Conv2d layer, counting its bias if it has one.

        Raises:
            NotImplementedError: For any other module (the published behaviour).
        """
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise NotImplementedError(f"Only Linear and Conv2d layers have factors, got {module}.")
        return layer_dims(module, module.bias is not None)

    def _get_param_group_entry(self, module: nn.Module, entry: str) -> Any:
        """The published package's private look-up, kept for code written against it:
        the value of ``entry`` in the parameter group of the layer ``module``."""
        for layer in self._layers:
            if layer.module is module:
                return self.param_groups[layer.group_index][entry]
        raise KeyError(f"{type(module).__name__} is not a layer this optimizer preconditions.")


def _cast_preconditioner(K: StructuredMatrix, C: StructuredMatrix) -> Callable[[Tensor], Tensor]:
    def precondition(grad: Tensor) -> Tensor:
        # A copy: the natural gradient may work in its argument, the reader's tensor.
        return singd_natural_gradient(K.to(dtype=grad.dtype), C.to(dtype=grad.dtype), grad.clone())

    return precondition
