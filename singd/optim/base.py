"""The stateful shell shared by the Kronecker-factored optimizers (SINGD, KFAC).

`KroneckerOptimizer` orchestrates what does not depend on how a preconditioner is
represented or updated; each concern lives in a module of its own:

- `singd.optim.coverage`: which parameters the factors cover (supported layers,
  parameter groups), the fallback optimizer for the rest, layers whose forward never
  runs;
- `singd.optim.hooks`: the forward and backward hooks that collect the curvature terms;
- `singd.optim.scaling`: GradScaler bookkeeping (which scale un-scales what, when a
  step is skipped);
- `singd.optim.distributed`: the torch.distributed all-reductions, with and without
  the DDP wrapper;
- `singd.optim.functional`: the updates themselves (SINGD's factor update, the natural
  gradient, the heavy-ball parameter update with weight decay);
- `singd.optim.accounting`: bytes of state by category;
- `singd.optim.checkpoint`: what a checkpoint holds per layer, and the checks a
  checkpoint passes before it loads;
- `singd.optim.precision`: ``precision="auto"``, each factor widened before it fails.

A subclass stores its per-layer state in ``self._factors[layer.name]`` (a dict of
structured matrices or tensors; these are checkpointed generically) and implements
`_init_layer`, `_input_statistic` (with `_input_statistic_entries`), `_accumulate`,
`_update_preconditioner` and `_precondition`; it names its accumulators in
``ACCUMULATORS`` and the byte category of each other state entry in
``BYTE_CATEGORIES``. For ``precision="auto"`` it also implements `_precision_readings`
and `_promote`, and names the factors whose dtype the curvature rows take in
``CURVATURE_FACTORS``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim import Optimizer

from singd.optim import accounting, checkpoint, coverage, distributed, fsdp
from singd.optim.coverage import DEFAULT_FALLBACK, NO_LAYER, FallbackFactory
from singd.optim.functional import heavy_ball_
from singd.optim.hooks import LayerHooks, reset_passes
from singd.optim.layers import (
    KroneckerLayer,
    gradient_matrix,
    is_supported,
    process_grad_output,
    process_input,
    split_matrix,
)
from singd.optim.precision import PRECISIONS, Escalation, PrecisionEvent
from singd.optim.scaling import Scale, not_one, skip_verdict, unscale_output_rows
from singd.optim.validation import check_common_group, check_number, group_location
from singd.structures.base import StructuredMatrix

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["DEFAULT_FALLBACK", "FallbackFactory", "KroneckerOptimizer", "Scale", "check_number"]


class KroneckerOptimizer(Optimizer):
    """Base class of optimizers with one Kronecker-factored preconditioner per layer.

    Args:
        model: The model (an ``nn.Module``, or one wrapped in
            ``DistributedDataParallel``); its supported layers are hooked.
        params: ``None`` (all parameters of ``model`` that require gradients),
            an iterable of tensors, or parameter groups (dicts).
        defaults: Hyperparameter defaults, settable per parameter group. Must hold
            ``lr``, ``momentum``, ``weight_decay``, ``T``, ``loss_average`` and
            ``kfac_approx``.
        fallback: Optimizer for parameters no Kronecker factor covers (normalisation
            layers, embeddings, attention projections, layers whose forward never
            runs). ``"adamw"`` (default): ``torch.optim.AdamW`` with its own defaults
            except ``lr`` and ``weight_decay``, which follow each parameter group
            (kept in sync at every step, so LR schedulers act on both). A callable
            receives the list of parameter groups and returns an optimizer. ``None``:
            such parameters are not trained (a warning names them), as in the
            published SINGD. The fallback is stepped, zeroed and checkpointed with this
            optimizer.
        warn_unsupported: With ``fallback=None``, warn about untrained parameters.
        init_grad_scale: The first GradScaler scale (or a number of its magnitude).
        precision: ``None`` (each factor keeps the dtype asked for) or ``"auto"``
            (a factor is widened when its readings near its dtype's limits,
            `singd.optim.precision`; the changes are in `precision_events`).
    """

    _step_supports_amp_scaling = True  # name fixed by torch.amp.GradScaler
    ACCUMULATORS: dict[str, str] = {}
    """Per-layer curvature accumulators: key in ``_factors`` -> ``"input"``/``"output"``."""
    BYTE_CATEGORIES: dict[str, str] = {}
    """Per-layer state keys -> their `state_bytes` category (others: accumulators)."""
    CURVATURE_FACTORS: tuple[str, str] = ("", "")
    """The factors (input side, output side) whose dtype the curvature rows take."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        *,
        fallback: str | FallbackFactory | None = DEFAULT_FALLBACK,
        warn_unsupported: bool = True,
        init_grad_scale: float = 1.0,
        precision: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be None or 'auto', got {precision!r}.")
        self._escalation = Escalation() if precision == "auto" else None
        if isinstance(model, DataParallel):
            raise ValueError(
                "DataParallel is not supported; wrap the model in "
                "DistributedDataParallel or pass the bare model instead."
            )
        self._ddp = isinstance(model, DistributedDataParallel)
        module = model.module if self._ddp else model
        if not isinstance(module, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}.")
        if fallback is not None and fallback != DEFAULT_FALLBACK and not callable(fallback):
            raise ValueError(
                f"fallback must be 'adamw', None or a callable building an optimizer "
                f"from parameter groups, got {fallback!r}."
            )
        check_number(init_grad_scale, "init_grad_scale", open_low=True)
        if not any(is_supported(m) for m in module.modules()):
            raise ValueError(NO_LAYER)
        self._fallback_factory = coverage.adamw if fallback == DEFAULT_FALLBACK else fallback
        self._warn_unsupported = warn_unsupported

        if params is None:
            params = coverage.default_params(
                module, self._fallback_factory is not None, warn_unsupported
            )
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
        # FSDP2: DTensor shards whose gradients FSDP has averaged (`singd.optim.fsdp`).
        self._sharded = fsdp.check_sharding(module, self.param_groups)

        self.steps = 0
        # Scales by step (`singd.optim.scaling`): Python floats, or 0-d tensors on the
        # device where a GradScaler hands its scale over.
        self._grad_scales: dict[int, Scale] = {-1: float(init_grad_scale)}
        self._factors: dict[str, dict[str, StructuredMatrix | Tensor]] = {}
        self._module = module
        self._layers = coverage.find_layers(module, self.param_groups)
        if not self._layers:
            raise ValueError(NO_LAYER)
        covered = {id(p) for layer in self._layers for p in layer.params}
        self._fallback_params: list[list[Tensor]] = [
            [p for p in g["params"] if id(p) not in covered] for g in self.param_groups
        ]
        self._fallback_layers: list[str] = []
        self._silent_checked = False
        if self._fallback_factory is None and warn_unsupported:
            coverage.warn_untrained(self._fallback_params, "they belong to no supported layer")
        self.fallback: Optimizer | None = coverage.build_fallback(
            self._fallback_factory, self.param_groups, self._fallback_params
        )
        # The optimized weights: under FSDP2 the module holds another (unsharded, perhaps
        # in a mixed-precision policy's dtype) tensor while its forward and backward run.
        self._weights = {layer.name: layer.module.weight for layer in self._layers}
        self._hooks = LayerHooks(self, self._layers)
        self._handles: list[RemovableHandle] = []  # other hooks than the layers'
        # Sharded state (FSDP2, several ranks): layer name -> the rank holding its factors.
        self._owners: dict[str, int] = {}
        self._lent_at = -1  # the step whose forward pass the owners lent factors for
        if self._sharded and distributed.world_size() > 1:
            if precision is not None:
                raise ValueError(
                    "precision='auto' is not supported on a model sharded with fully_shard "
                    "over several ranks (each rank holds only its layers' factors); pass "
                    "precision=None."
                )
            self._owners = fsdp.assign_owners(self)
            self._handles.append(
                module.register_forward_pre_hook(lambda *_: fsdp.lend_factors(self))
            )
        for layer in self._layers:
            self._factors[layer.name] = {}
            if self.owns(layer):
                self._init_layer(layer)

    # ----------------------------------------------------------------- set-up
    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        """Check a parameter group's hyperparameters; subclasses extend this.

        Raises:
            ValueError: One sentence naming the bad value and what would be right.
        """
        check_common_group(group, group_location(index, len(self.param_groups)))

    def owns(self, layer: KroneckerLayer) -> bool:
        """Whether this rank holds the layer's second-order state: always, except on a
        model sharded over several ranks (`singd.optim.fsdp.assign_owners`)."""
        return not self._owners or self._owners[layer.name] == distributed.rank()

    def _move_to_fallback(self, names: list[str]) -> None:
        """Hand whole layers to the fallback optimizer (their forward never ran)."""
        moved = [layer for layer in self._layers if layer.name in names]
        for layer in moved:
            self._hooks.detach(layer)
            self._layers.remove(layer)
            del self._factors[layer.name]
            for p in layer.params:
                self.state.pop(p, None)
            self._fallback_params[layer.group_index] += layer.params
            self._fallback_layers.append(layer.name)
        self.fallback = coverage.build_fallback(
            self._fallback_factory, self.param_groups, self._fallback_params
        )

    def _handle_silent_layers(self) -> None:
        """At the first step taken, hand layers whose forward never ran to the fallback."""
        self._silent_checked = True
        names = [layer.name for layer in self._layers if not layer.fired]
        if not names:
            return
        warnings.warn(
            coverage.silent_layers_message(names, self._fallback_factory is not None),
            stacklevel=4,
        )
        self._move_to_fallback(names)

    def coverage(self) -> coverage.Coverage:
        """Which of the model's parameters the Kronecker factors precondition and which
        go to the fallback optimizer (or are not trained), by layer type.

        Returns:
            A `singd.optim.coverage.Coverage`: tensor and element counts and fractions
            per layer class name (``print`` it for a table, ``as_dict()`` for JSON).
            Layers whose forward never runs move to the fallback at the first step;
            until then ``final`` is False.
        """
        return coverage.coverage_report(
            self._module, self._layers, self.fallback, self._fallback_layers, self._silent_checked
        )

    def _reduce_input(self, layer: KroneckerLayer, x: Tensor) -> Any:
        """The layer's `_input_statistic` of its input ``x`` (called by the hooks)."""
        group = self.param_groups[layer.group_index]
        a = process_input(x.to(self._curvature_dtypes(layer)[0]), layer, group["kfac_approx"])
        return self._input_statistic(layer, a)

    # ------------------------------------------------------ subclass interface
    def _configured_dtypes(self, layer: KroneckerLayer) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes asked for on the two sides: ``preconditioner_dtype`` or the weight's."""
        dtypes = self.param_groups[layer.group_index].get("preconditioner_dtype", (None, None))
        weight_dtype = self._weight_dtype(layer)
        return dtypes[0] or weight_dtype, dtypes[1] or weight_dtype

    def _weight_dtype(self, layer: KroneckerLayer) -> torch.dtype:
        """The dtype of the optimized weight (not of what FSDP2 computes with)."""
        return self._weights[layer.name].dtype

    def _curvature_dtypes(self, layer: KroneckerLayer) -> tuple[torch.dtype, torch.dtype]:
        """dtypes of the rows ``a`` and ``g``: the configured ones, as promoted (if at all)
        under ``precision="auto"``."""
        dtypes = self._configured_dtypes(layer)
        if self._escalation is None:
            return dtypes
        input_side, output_side = self.CURVATURE_FACTORS
        return (
            self._escalation.dtype(layer.name, input_side, dtypes[0]),
            self._escalation.dtype(layer.name, output_side, dtypes[1]),
        )

    @property
    def precision(self) -> str | None:
        """``None`` or ``"auto"``, as constructed."""
        return None if self._escalation is None else "auto"

    @property
    def precision_events(self) -> list[PrecisionEvent]:
        """Every factor's change of dtype so far, in order (empty unless ``"auto"``)."""
        return [] if self._escalation is None else list(self._escalation.events)

    def _precision_readings(self, layer: KroneckerLayer) -> dict[str, tuple[Tensor, torch.dtype]]:
        """Each factor's `singd.optim.precision.readings` and its dtype, after an update."""
        raise NotImplementedError

    def _promote(self, layer: KroneckerLayer, factor: str, dtype: torch.dtype, why: str) -> None:
        """Widen one factor to ``dtype`` (``why``: the reading that crossed its bound)."""
        raise NotImplementedError

    def _init_layer(self, layer: KroneckerLayer) -> None:
        """Create the layer's state in ``self._factors[layer.name]``."""
        raise NotImplementedError

    def _input_statistic(self, layer: KroneckerLayer, a: Tensor) -> Any:
        """What the layer's curvature needs of the input rows ``a`` (n x d_K)."""
        raise NotImplementedError

    def _input_statistic_entries(self, layer: KroneckerLayer) -> int:
        """How many entries `_input_statistic` holds (to choose when to reduce the input)."""
        raise NotImplementedError

    def _reduce_output(self, layer: KroneckerLayer, grad: Tensor) -> Any:
        """What `_accumulate` needs of the layer's output gradient (called by the hooks):
        here the rows ``g`` (n x d_C, `process_grad_output`) in the output side's curvature
        dtype, divided by ``sqrt(s_{t-1})`` (`singd.optim.scaling`)."""
        group = self.param_groups[layer.group_index]
        g = process_grad_output(
            grad.to(self._curvature_dtypes(layer)[1]),
            layer,
            group["loss_average"],
            group["kfac_approx"],
        )
        return unscale_output_rows(g, self._grad_scales[self.steps - 1])

    def _accumulate(self, layer: KroneckerLayer, statistic: Any, output: Any) -> None:
        """Add one backward call's curvature terms: the input's `_input_statistic` and the
        output gradient's `_reduce_output`."""
        raise NotImplementedError

    def _update_preconditioner(self, layer: KroneckerLayer, grad_unscaling: Scale) -> None:
        """Update the layer's preconditioner from its accumulators, then clear them.

        Args:
            layer: The layer.
            grad_unscaling: Factor that completes the un-scaling of output-side terms,
                ``s_{t-1} / s_t^2`` (1.0 without a GradScaler).
        """
        raise NotImplementedError

    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        """The preconditioned ``d_C x d_K`` gradient, in the dtype of ``grad``.

        ``grad`` is the optimizer's own copy: it may be overwritten and returned.
        """
        raise NotImplementedError

    def _clear_accumulators(self, layer: KroneckerLayer) -> None:
        state = self._factors[layer.name]
        for key in self.ACCUMULATORS:
            state.pop(key, None)
        reset_passes(layer)

    # ------------------------------------------------------------------- step
    def set_current_grad_scale(self, grad_scale: float | Tensor) -> None:
        """Record the gradient scale of the current step (done by `step` if not called).

        Call it before `step` when the scale reaches the optimizer another way than
        through ``GradScaler.step``, and after ``scaler.unscale_(optimizer)`` (PyTorch's
        recipe for gradient clipping): the scaler then hands no scale over, and `step`
        raises ValueError without one. A tensor (GradScaler's scale) stays on its device.
        """
        if isinstance(grad_scale, Tensor):
            # A copy in float64, the precision of the Python numbers used otherwise.
            self._grad_scales[self.steps] = grad_scale.detach().to(torch.float64, copy=True)
            return  # the step-0 warning below is judged in `step`, with its one read
        self._grad_scales[self.steps] = float(grad_scale)
        self._warn_first_scale(float(grad_scale))

    def _warn_first_scale(self, grad_scale: float, stacklevel: int = 4) -> None:
        init = self._grad_scales.get(-1)
        if self.steps == 0 and init == 1.0 and grad_scale != 1.0 and grad_scale > 0:
            warnings.warn(
                f"The gradient scale at step 0 is {grad_scale:g} but init_grad_scale is "
                f"{init:g}; pass init_grad_scale={grad_scale:g} for stabler first "
                "curvature estimates.",
                stacklevel=stacklevel,
            )

    def _gradient_divisor(self) -> Scale:
        """The scale to divide gradients by: none if the scaler already un-scaled them."""
        attr = getattr(self, "grad_scale", 1.0)
        if attr is None:  # GradScaler.unscale_ ran before step
            return 1.0
        return self._grad_scales[self.steps]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the preconditioners (every T steps) and the parameters.

        Args:
            closure: Optional; re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps not in self._grad_scales:
            scale = getattr(self, "grad_scale", None)
            if scale is None and hasattr(self, "grad_scale"):
                # GradScaler.step after GradScaler.unscale_: the gradients are un-scaled,
                # but the output gradients the curvature terms came from are not, by a
                # scale that reaches the optimizer no other way.
                raise ValueError(
                    "GradScaler.unscale_ ran before this step, so the optimizer cannot "
                    "tell the scale its curvature terms carry; call "
                    "optimizer.set_current_grad_scale(scaler.get_scale()) before "
                    "scaler.step(optimizer)."
                )
            self.set_current_grad_scale(1.0 if scale is None else scale)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and distributed.world_size() > 1 and not self._ddp:
            found_inf = distributed.agree_found_inf(found_inf, self._layers[0].module.weight.device)
        infs, bad_scale, read_scale = skip_verdict(self._grad_scales[self.steps], found_inf)
        if read_scale is not None:
            self._warn_first_scale(read_scale, stacklevel=3)
        if infs or bad_scale:
            warnings.warn(
                "Gradients hold infs or NaNs; skipping this step."
                if infs
                else "The gradient scale is 0 or not finite (a GradScaler whose scale "
                "collapsed after many non-finite steps); skipping this step.",
                stacklevel=2,
            )
            if bad_scale:
                # Later backward passes un-scale by this step's scale: keep the last usable.
                self._grad_scales[self.steps] = self._grad_scales[self.steps - 1]
            for layer in self._layers:
                self._clear_accumulators(layer)
                layer.skipped_steps += 1
        else:
            if not self._silent_checked:
                fsdp.check_weights_kept(self._layers, self._weights)
                self._handle_silent_layers()
            self._step_layers()
            if self.fallback is not None:
                coverage.step_fallback(
                    self.fallback,
                    self.param_groups,
                    self._gradient_divisor(),
                    distributed.world_size(),
                    self._ddp or self._sharded,
                )
        self.steps += 1
        for t in [t for t in self._grad_scales if t < self.steps - 1]:
            del self._grad_scales[t]
        self._hooks.sync(self._layers)
        return loss

    def _loss_averaged(self, layer: KroneckerLayer) -> bool:
        """Whether the layer's group averages its loss (else: a summed loss)."""
        return self.param_groups[layer.group_index]["loss_average"] is not None

    def _step_layers(self) -> None:
        prev_scale, scale = self._grad_scales[self.steps - 1], self._grad_scales[self.steps]
        # Tensors (a GradScaler's, float64) stay on the device: never read.
        grad_unscaling = prev_scale / scale**2
        divisor = self._gradient_divisor()
        world = distributed.world_size()
        active = [layer for layer in self._layers if layer.module.weight.grad is not None]
        due = [
            layer
            for layer in active
            if layer.passes > 0 and self.steps % self.param_groups[layer.group_index]["T"] == 0
        ]
        if world > 1:
            # Each rank's scaler has its own scale: un-scale the output-side terms locally
            # before they are mixed, so every rank ends with the same, un-scaled sum.
            # With sharded state each layer's terms go to its owner only.
            distributed.all_reduce_accumulators(
                [self._factors[layer.name] for layer in due],
                self.ACCUMULATORS,
                [self._loss_averaged(layer) for layer in due],
                grad_unscaling,
                [self._owners[layer.name] for layer in due] if self._owners else None,
            )
            grad_unscaling = 1.0
        self._update_preconditioners([layer for layer in due if self.owns(layer)], grad_unscaling)
        for layer in due:
            reset_passes(layer)
        for layer in self._layers:
            if not self.owns(layer):  # the lent factors and the sent terms go
                self._factors[layer.name] = {}
        if self._escalation is not None and due:
            self._escalation.check(self, due)
        for layer in self._layers:
            if layer not in due:
                self._clear_accumulators(layer)
        if world == 1 and not self._sharded and self._batched_step(active, divisor):
            return
        reduced = self._ddp or self._sharded  # gradients averaged over ranks already
        directions = []
        directions_of = (
            fsdp.owned_directions
            if self._owners
            else fsdp.sharded_directions
            if self._sharded
            else type(self)._layer_directions
        )
        for layer in active:
            # Inside DDP or FSDP, a summed loss: the gradients were averaged, undo it.
            summed = reduced and not self._loss_averaged(layer)
            directions.append(directions_of(self, layer, divisor, world if summed else 1.0))
        steps = [t for layer_steps in directions for t in layer_steps]
        if world > 1 and not reduced:
            distributed.all_reduce_split(
                steps,
                [
                    self._loss_averaged(layer)
                    for layer, layer_steps in zip(active, directions, strict=True)
                    for _ in layer_steps
                ],
            )
        # One momentum and parameter update per parameter group (elementwise, so the same
        # bits as per layer), over its layers' parameters in layer order.
        by_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        params = [(layer.group_index, p) for layer in active for p in layer.params]
        for (index, p), step in zip(params, steps, strict=True):
            group_params, group_steps = by_group.setdefault(index, ([], []))
            group_params.append(p)
            group_steps.append(step)
        for index, (group_params, group_steps) in by_group.items():
            group = self.param_groups[index]
            heavy_ball_(
                group_params,
                group_steps,
                self.state,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )

    def _gradient_matrix(self, layer: KroneckerLayer) -> Tensor | None:
        """The layer's ``[dW | db]`` for `curvature_state`: None without a gradient, and on
        a sharded model (gathering it is a collective, which a read-only view must not
        start on one rank)."""
        if self._sharded or layer.module.weight.grad is None:
            return None
        return gradient_matrix(layer)

    def _update_preconditioners(self, layers: list[KroneckerLayer], grad_unscaling) -> None:
        """`_update_preconditioner` for each of ``layers``; a subclass may batch them
        (bitwise the same)."""
        for layer in layers:
            self._update_preconditioner(layer, grad_unscaling)

    def _batched_step(self, active: list[KroneckerLayer], divisor: Scale) -> bool:
        """Where a subclass batches the parameter update over layers (one process): make
        it for ``active`` and return True, bitwise what `_layer_directions` and
        `heavy_ball_` give; False (the default): the per-layer path follows."""
        return False

    def _layer_directions(
        self, layer: KroneckerLayer, divisor: Scale, factor: float
    ) -> list[Tensor]:
        """The preconditioned gradient of each of the layer's parameters (new tensors, the
        optimizer's own), of ``[dW | db] / divisor * factor``.

        This default goes through the ``d_C x d_K`` matrix `_precondition` works on; a
        subclass may override it to skip that copy where its preconditioner acts on the
        parameters apart (SINGD with two diagonal factors).
        """
        grad = gradient_matrix(layer)  # a new tensor: scaled in place
        if not_one(divisor):
            grad.div_(divisor)
        if factor != 1.0:
            grad.mul_(factor)
        return split_matrix(layer, self._precondition(layer, grad))

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: plain tensors and Python scalars, loadable with
        ``torch.load(..., weights_only=True)``.

        A callable ``lr_cov`` is stored as None (pass the schedule again when building
        the optimizer that loads the state, as with LR schedulers).
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            for key, value in group.items():
                if callable(value):
                    group[key] = None
        state["kronecker"] = {
            "steps": self.steps,
            "grad_scales": {
                t: float(v) if isinstance(v, Tensor) else v for t, v in self._grad_scales.items()
            },
            "layers": checkpoint.saved_layers(self),
            "fallback_layers": list(self._fallback_layers),
            "silent_checked": self._silent_checked,
            "fallback": None if self.fallback is None else self.fallback.state_dict(),
        }
        if self._escalation is not None:
            state["kronecker"]["precision"] = self._escalation.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict`; callable hyperparameters keep their current value.

        Raises:
            ValueError: In one sentence, at the first way the checkpoint does not fit this
                optimizer and model (`singd.optim.checkpoint`); nothing is loaded then.
        """
        checkpoint.check_state_dict(self, state_dict)
        state_dict = dict(state_dict)
        saved = state_dict.pop("kronecker")
        callables = [{k: v for k, v in group.items() if callable(v)} for group in self.param_groups]
        for own, saved_group in zip(callables, state_dict["param_groups"], strict=True):
            for key, value in saved_group.items():
                if value is None and key == "lr_cov" and key not in own:
                    raise ValueError(
                        "The checkpoint was saved with a schedule (callable) for lr_cov; "
                        "build the optimizer with that schedule again before loading it."
                    )
        names = [n for n in saved["fallback_layers"] if n not in self._fallback_layers]
        if names:
            self._move_to_fallback(names)
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, callables, strict=True):
            group.update(own)
        self.steps = saved["steps"]
        self._silent_checked = saved["silent_checked"]
        self._hooks.sync(self._layers)
        self._grad_scales = dict(saved["grad_scales"])
        checkpoint.restore_layers(self, saved["layers"])
        if self._escalation is not None:
            self._escalation.load_state_dict(saved.get("precision", {"dtypes": {}, "events": []}))
        if self.fallback is not None and saved["fallback"] is not None:
            self.fallback.load_state_dict(saved["fallback"])

    # ----------------------------------------------------------- accounting
    def state_bytes(self, total: bool = False) -> dict[str, int]:
        """Bytes of optimizer state by category (B), as `singd.optim.accounting` says:
        the factor categories of ``BYTE_CATEGORIES``, ``accumulators``,
        ``param_buffers`` (momentum buffers of the Kronecker-covered parameters) and
        ``fallback`` (tensors of the fallback optimizer's state). Under FSDP2, this rank's
        bytes (its layers' factors, its shards); ``total=True``: the whole model's (the
        shards' global sizes, every rank's factors: a collective, call it on every rank)."""
        counts = accounting.state_bytes(
            self._factors, self.BYTE_CATEGORIES, self.state, self.fallback, total
        )
        if total and self._owners:
            owned = [k for k in counts if k not in ("param_buffers", "fallback")]
            summed = torch.tensor([counts[k] for k in owned], dtype=torch.int64)
            distributed.all_reduce_flat([summed], average=False)
            counts.update(zip(owned, summed.tolist(), strict=True))
        return counts

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (calling it twice is harmless)."""
        self._hooks.remove()
        for handle in self._handles:
            handle.remove()
