"""Machinery shared by the Kronecker-factored optimizers (SINGD, KFAC).

`KroneckerOptimizer` does everything that does not depend on how a preconditioner is
represented or updated:

- finds the supported layers (``nn.Linear``, ``nn.Conv2d``) among the optimized
  parameters, checks the parameter groups, and hands every other parameter to a
  fallback optimizer;
- hooks the layers: a forward hook registers a tensor hook on the output, which
  receives the output gradient during backward. Full backward hooks break on in-place
  activations; a tensor hook does not. The hooks only act on steps with
  ``steps % T == 0``;
- turns inputs and output gradients into the rows ``a`` and ``g`` (`singd.optim.layers`),
  reduces ``a`` to the subclass's `_input_statistic` and passes both to `_accumulate`
  (one call per backward call of the layer, so gradient accumulation over several
  passes, and a layer run several times per forward, sum their curvature terms;
  `KroneckerLayer.passes` counts the calls and ``backward_passes`` the distinct
  backward passes). The input itself waits for the backward pass, where autograd keeps
  it anyway for the weight's gradient. But where saved-tensor hooks manage what
  autograd keeps (activation checkpointing, ``torch.autograd.graph.save_on_cpu``), a
  kept input is one they would free or move: there, if the statistic is at most
  1/`EAGER_INPUT_RATIO` of the input's size (diagonal, block-diagonal or hierarchical
  factors; dense ones over many rows), the forward hook reduces the input at once and
  only the statistic waits. On four checkpointed transformer MLP blocks with diagonal
  factors (`benchmarks/test_checkpoint_memory.py`) checkpointing saved 2% of an update
  step's peak tensor memory while the inputs waited, and saves 41% now (AdamW: 42%).
  Not done everywhere: in the forward the same work costs more (on this CPU, an MLP
  256-512-512-10 with diagonal factors and T=1: the forward gained 374 us, the backward
  lost 309, about 1% of the step). A segment's recomputation in the backward pass keeps
  its input: it is short-lived there;
- GradScaler bookkeeping, torch.distributed all-reductions, the parameter update with
  weight decay and heavy-ball momentum, checkpoints and the fallback optimizer.

A subclass stores its per-layer state in ``self._factors[layer.name]`` (a dict of
structured matrices or tensors; these are checkpointed generically) and implements
`_init_layer`, `_input_statistic` (with `_input_statistic_entries`), `_accumulate`,
`_update_preconditioner` and `_precondition`.

Gradient scaling (torch.amp.GradScaler). The scaler multiplies the loss by a scale
``s_t`` that is only known at ``step()``. During backward the output gradients are
divided by ``sqrt(s_{t-1})`` (the previous step's scale; ``init_grad_scale`` before the
first step), so an output-side curvature term carries ``s_t^2 / s_{t-1}``; the
preconditioner update receives ``grad_unscaling = s_{t-1} / s_t^2`` to remove the rest.
Gradients are divided by ``s_t`` before preconditioning. A step whose gradients hold
infs is skipped and its curvature terms dropped.

Distributed training (torch.distributed initialised, world size > 1):

- Without the DDP wrapper (as the published SINGD): input-side curvature terms are
  averaged over ranks, output-side terms averaged (``loss_average`` set) or summed
  (``None``), once per update just before it (un-scaled by each rank's own GradScaler
  scale first, since the ranks' scalers may disagree); natural gradients are averaged
  or summed likewise; fallback gradients too. Ranks agree on skipping a step when any
  of them found infs (a MAX all-reduce of ``found_inf``). Input rows are always
  normalised by their count, so averaging is what equals one process on the whole
  batch; the published package sums them for ``loss_average=None``.
- Inside ``DistributedDataParallel``: the wrapped model is accepted and unwrapped for
  the layers. DDP has already averaged the gradients, so only the curvature terms are
  all-reduced; for ``loss_average=None`` gradients are multiplied by the world size,
  turning DDP's average back into the sum a summed loss over the whole batch has.

Layers whose forward never runs. Some supported layers hold weights that their owner
uses directly (``nn.MultiheadAttention.out_proj`` is never called). At the first step
that is not skipped, every layer whose forward hook has never fired is moved to the
fallback optimizer with a warning (with ``fallback=None`` it is left untrained, with a
warning). A layer first used after that step stays Kronecker-factored.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from numbers import Real
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim import AdamW, Optimizer

from singd.optim.layers import (
    KFAC_APPROXES,
    LOSS_AVERAGES,
    SUPPORTED_LAYERS,
    KroneckerLayer,
    check_conv_padding,
    gradient_matrix,
    layer_dims,
    process_grad_output,
    process_input,
    split_matrix,
)
from singd.structures import get_structure
from singd.structures.base import StructuredMatrix

_NO_LAYER = (
    "model has no nn.Linear or nn.Conv2d layer whose weight is among the optimized "
    "parameters; use a model with such a layer or another optimizer."
)
FallbackFactory = Callable[[list[dict[str, Any]]], Optimizer]
Scale = float | Tensor
"""A gradient scale or un-scaling factor: a Python number, or a 0-d tensor on the device."""


def _not_one(value: Scale) -> bool:
    """Whether multiplying by ``value`` may change something (a tensor always may: it is
    not read, so that nothing waits for the device)."""
    return isinstance(value, Tensor) or value != 1.0


DEFAULT_FALLBACK = "adamw"


_CURRENT_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


def _graph_task_id() -> int | None:
    """The autograd engine's id of the backward pass now running (one per
    ``backward()`` call), or None where this torch does not tell it; then every call of
    a layer counts as a pass of its own."""
    return None if _CURRENT_GRAPH_TASK is None else _CURRENT_GRAPH_TASK()


EAGER_INPUT_RATIO = 8
"""Under saved-tensor hooks, the forward hook reduces a layer's input to its statistic at
once where the statistic has at most 1/8 of the input's entries (see the module
docstring): the statistic then costs at most an eighth of the input while it waits for
the backward pass."""

_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensors_managed() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, ``save_on_cpu``) manage what
    autograd keeps for the backward pass; True where this torch does not tell. False
    while torch.compile traces the hook (dynamo cannot trace the query; a compiled graph
    does its own checkpointing)."""
    if torch.compiler.is_compiling():
        return False
    return _SAVED_TENSORS_HOOKS is None or _SAVED_TENSORS_HOOKS(False) is not None


def _reset_passes(layer: KroneckerLayer) -> None:
    layer.passes = layer.backward_passes = 0
    layer.graph_task = -1


def _adamw(groups: list[dict[str, Any]]) -> Optimizer:
    return AdamW(groups)


def check_number(
    value: Any, name: str, *, low: float = 0.0, high: float = math.inf, open_low=False
) -> None:
    """Raise ValueError unless ``value`` is a real number in ``[low, high)`` (``(low, high)``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value < high
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low:g}"
        bounds += f" and < {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}.")


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
    """

    _step_supports_amp_scaling = True  # name fixed by torch.amp.GradScaler
    ACCUMULATORS: dict[str, str] = {}
    """Per-layer curvature accumulators: key in ``_factors`` -> ``"input"``/``"output"``."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        *,
        fallback: str | FallbackFactory | None = DEFAULT_FALLBACK,
        warn_unsupported: bool = True,
        init_grad_scale: float = 1.0,
    ) -> None:
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
        if not any(isinstance(m, SUPPORTED_LAYERS) for m in module.modules()):
            raise ValueError(_NO_LAYER)
        self._fallback_factory = _adamw if fallback == DEFAULT_FALLBACK else fallback
        self._warn_unsupported = warn_unsupported

        if params is None:
            params = self._default_params(module)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)

        self.steps = 0
        # Scales by step: Python floats, or 0-d tensors where a GradScaler hands its scale
        # over (kept on the device: reading one would wait for the step's kernels).
        self._grad_scales: dict[int, Scale] = {-1: float(init_grad_scale)}
        self._factors: dict[str, dict[str, StructuredMatrix | Tensor]] = {}
        self._layers = self._find_layers(module)
        if not self._layers:
            raise ValueError(_NO_LAYER)
        covered = {id(p) for layer in self._layers for p in layer.params}
        self._fallback_params: list[list[Tensor]] = [
            [p for p in g["params"] if id(p) not in covered] for g in self.param_groups
        ]
        self._fallback_layers: list[str] = []
        self._silent_checked = False
        self.fallback: Optimizer | None = None
        if self._fallback_factory is None:
            self._warn_untrained(self._fallback_params, "they belong to no supported layer")
        self._build_fallback()

        self._handles = [
            layer.module.register_forward_hook(partial(self._forward_hook, layer))
            for layer in self._layers
        ]
        for layer in self._layers:
            self._factors[layer.name] = {}
            self._init_layer(layer)

    # ----------------------------------------------------------------- set-up
    def _default_params(self, module: nn.Module) -> list[Tensor]:
        """All trainable parameters; without a fallback, those of supported layers only."""
        if self._fallback_factory is not None:
            return [p for p in module.parameters() if p.requires_grad]
        params, seen = [], set()
        for name, mod in module.named_modules():
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if isinstance(mod, SUPPORTED_LAYERS):
                params += [p for p in own if id(p) not in seen]
                seen.update(id(p) for p in own)
            elif own and self._warn_unsupported:
                warnings.warn(
                    f"Parameters of layer {name!r} ({type(mod).__name__}) will not be "
                    "trained: fallback=None and the layer is not nn.Linear or nn.Conv2d.",
                    stacklevel=4,
                )
        return params

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        """Check a parameter group's hyperparameters; subclasses extend this.

        Raises:
            ValueError: One sentence naming the bad value and what would be right.
        """
        where = f" (parameter group {index})" if len(self.param_groups) > 1 else ""
        check_number(group["lr"], f"lr{where}")
        check_number(group["momentum"], f"momentum{where}", high=1.0)
        check_number(group["weight_decay"], f"weight_decay{where}")
        T = group["T"]
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T{where} must be a positive integer, got {T!r}.")
        if group["loss_average"] not in LOSS_AVERAGES:
            raise ValueError(
                f"loss_average{where} must be None, 'batch' or 'batch+sequence', "
                f"got {group['loss_average']!r}."
            )
        if group["kfac_approx"] not in KFAC_APPROXES:
            raise ValueError(
                f"kfac_approx{where} must be 'expand' or 'reduce', got {group['kfac_approx']!r}."
            )

    def _find_layers(self, module: nn.Module) -> list[KroneckerLayer]:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        layers, claimed = [], set()
        for name, mod in module.named_modules():
            if not isinstance(mod, SUPPORTED_LAYERS) or id(mod.weight) not in group_of:
                continue
            if id(mod.weight) in claimed:  # a weight shared with an earlier layer
                continue
            check_conv_padding(mod)
            bias = mod.bias
            has_bias = bias is not None and id(bias) in group_of and id(bias) not in claimed
            if has_bias and group_of[id(bias)] != group_of[id(mod.weight)]:
                raise ValueError(
                    f"The weight and bias of layer {name!r} are in parameter groups "
                    f"{group_of[id(mod.weight)]} and {group_of[id(bias)]}; put them in "
                    "the same group."
                )
            dim_K, dim_C = layer_dims(mod, has_bias)
            layer = KroneckerLayer(
                name=name,
                module=mod,
                group_index=group_of[id(mod.weight)],
                has_bias=has_bias,
                dim_K=dim_K,
                dim_C=dim_C,
            )
            layer.param_names = tuple(names[id(p)] for p in layer.params)
            claimed.update(id(p) for p in layer.params)
            layers.append(layer)
        return layers

    def _warn_untrained(self, groups: list[list[Tensor]], why: str) -> None:
        count = sum(len(ps) for ps in groups)
        if count and self._warn_unsupported:
            warnings.warn(
                f"{count} optimized parameter tensor(s) will not be trained ({why}) "
                "because fallback=None; pass fallback='adamw' to train them.",
                stacklevel=4,
            )

    def _build_fallback(self) -> None:
        """(Re)build the fallback optimizer over the current fallback parameters."""
        self.fallback = None
        if self._fallback_factory is None:
            return
        groups = [
            {
                "params": ps,
                "lr": self.param_groups[i]["lr"],
                "weight_decay": self.param_groups[i]["weight_decay"],
                "group_index": i,
            }
            for i, ps in enumerate(self._fallback_params)
            if ps
        ]
        if groups:
            self.fallback = self._fallback_factory(groups)

    def _move_to_fallback(self, names: list[str]) -> None:
        """Hand whole layers to the fallback optimizer (their forward never ran)."""
        moved = [layer for layer in self._layers if layer.name in names]
        for layer in moved:
            self._handles.pop(self._layers.index(layer)).remove()
            self._layers.remove(layer)
            del self._factors[layer.name]
            for p in layer.params:
                self.state.pop(p, None)
            self._fallback_params[layer.group_index] += layer.params
            self._fallback_layers.append(layer.name)
        self._build_fallback()

    # ------------------------------------------------------------------ hooks
    def _forward_hook(
        self, layer: KroneckerLayer, module: nn.Module, inputs: tuple, output: Tensor
    ) -> None:
        layer.fired = True
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if self.steps % self.param_groups[layer.group_index]["T"] != 0:
            return
        x = inputs[0].detach()
        task = _graph_task_id()
        recomputing = task is not None and task != -1  # a checkpointed segment, again
        if (
            recomputing
            or not _saved_tensors_managed()
            or self._input_statistic_entries(layer) * EAGER_INPUT_RATIO > x.numel()
        ):
            # A reentrant checkpoint backpropagates each recomputed segment in a backward
            # pass of its own, nested in the one that recomputes it: that outer pass is
            # the one the layer's gradient belongs to.
            output.register_hook(partial(self._backward_hook, layer, x, None, task))
            return
        # As in the backward pass: no autocast (it would compute the statistic in the
        # autocast dtype, not the curvature dtype); switched off only where it is on.
        device = x.device.type
        autocast_off = (
            torch.autocast(device, enabled=False)
            if torch.is_autocast_enabled(device)
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast_off:
            statistic = self._reduce_input(layer, x)
        output.register_hook(partial(self._backward_hook, layer, None, statistic, None))

    def _reduce_input(self, layer: KroneckerLayer, x: Tensor) -> Any:
        group = self.param_groups[layer.group_index]
        a = process_input(x.to(self._curvature_dtypes(layer)[0]), layer, group["kfac_approx"])
        return self._input_statistic(layer, a)

    def _backward_hook(
        self,
        layer: KroneckerLayer,
        x: Tensor | None,
        statistic: Any,
        outer_task: int | None,
        grad: Tensor,
    ) -> None:
        group = self.param_groups[layer.group_index]
        dtype_g = self._curvature_dtypes(layer)[1]
        with torch.no_grad():
            if statistic is None:
                statistic = self._reduce_input(layer, x)
            g = process_grad_output(
                grad.detach().to(dtype_g), layer, group["loss_average"], group["kfac_approx"]
            )
            prev_scale = self._grad_scales[self.steps - 1]
            if isinstance(prev_scale, Tensor):
                g = g / prev_scale.sqrt()
            elif prev_scale != 1.0:
                g = g / math.sqrt(prev_scale)
            self._accumulate(layer, statistic, g)
        layer.passes += 1
        task = outer_task if outer_task is not None and outer_task != -1 else _graph_task_id()
        if task is None or task != layer.graph_task:
            layer.backward_passes += 1
            layer.graph_task = -1 if task is None else task

    # ------------------------------------------------------ subclass interface
    def _curvature_dtypes(self, layer: KroneckerLayer) -> tuple[torch.dtype, torch.dtype]:
        """dtypes of the rows ``a`` and ``g``: ``preconditioner_dtype`` or the weight's."""
        dtypes = self.param_groups[layer.group_index].get("preconditioner_dtype", (None, None))
        weight_dtype = layer.module.weight.dtype
        return dtypes[0] or weight_dtype, dtypes[1] or weight_dtype

    def _init_layer(self, layer: KroneckerLayer) -> None:
        """Create the layer's state in ``self._factors[layer.name]``."""
        raise NotImplementedError

    def _input_statistic(self, layer: KroneckerLayer, a: Tensor) -> Any:
        """What the layer's curvature needs of the input rows ``a`` (n x d_K)."""
        raise NotImplementedError

    def _input_statistic_entries(self, layer: KroneckerLayer) -> int:
        """How many entries `_input_statistic` holds (to choose when to reduce the input)."""
        raise NotImplementedError

    def _accumulate(self, layer: KroneckerLayer, statistic: Any, g: Tensor) -> None:
        """Add one backward call's curvature terms: the input's `_input_statistic` and the
        output-gradient rows ``g`` (n x d_C)."""
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
        _reset_passes(layer)

    # ------------------------------------------------------------------- step
    def set_current_grad_scale(self, grad_scale: float | Tensor) -> None:
        """Record the gradient scale of the current step (done by `step` if not called).

        Call it before `step` when the scale reaches the optimizer another way than
        through ``GradScaler.step``. A tensor (GradScaler's scale) stays on its device.
        """
        if isinstance(grad_scale, Tensor):
            # A copy in float64, the precision of the Python numbers used otherwise.
            self._grad_scales[self.steps] = grad_scale.detach().to(torch.float64, copy=True)
            return  # the step-0 warning below is judged in `step`, with its one read
        self._grad_scales[self.steps] = float(grad_scale)
        self._warn_first_scale(float(grad_scale))

    def _warn_first_scale(self, grad_scale: float) -> None:
        init = self._grad_scales.get(-1)
        if self.steps == 0 and init == 1.0 and grad_scale != 1.0 and grad_scale > 0:
            warnings.warn(
                f"The gradient scale at step 0 is {grad_scale:g} but init_grad_scale is "
                f"{init:g}; pass init_grad_scale={grad_scale:g} for stabler first "
                "curvature estimates.",
                stacklevel=4,
            )

    def _gradient_divisor(self) -> Scale:
        """The scale to divide gradients by: none if the scaler already un-scaled them."""
        attr = getattr(self, "grad_scale", 1.0)
        if attr is None:  # GradScaler.unscale_ ran before step
            return 1.0
        return self._grad_scales[self.steps]

    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

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
            self.set_current_grad_scale(1.0 if scale is None else scale)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and self._world() > 1 and not self._ddp:
            # Each rank's scaler saw only its own gradients: agree on skipping, or the
            # ranks would call different collectives and hang.
            # On the parameters' device: NCCL reduces CUDA tensors only.
            device = self._layers[0].module.weight.device
            found_inf = torch.as_tensor(found_inf, device=device).reshape(1).float()
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        infs, bad_scale = self._skip_verdict(found_inf)
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
                self._handle_silent_layers()
            self._step_layers()
            self._step_fallback()
        self.steps += 1
        for t in [t for t in self._grad_scales if t < self.steps - 1]:
            del self._grad_scales[t]
        return loss

    def _skip_verdict(self, found_inf: Tensor | None) -> tuple[bool, bool]:
        """``(infs, bad_scale)``: whether the GradScaler found infs, and whether the
        step's scale is not a positive finite number (a scale that collapsed to 0 makes
        every gradient 0 and every un-scaling a division by 0: the step is skipped, as
        torch's optimizers skip it, and counted).

        With a GradScaler this is the step's one host read (torch's optimizers read
        ``found_inf`` once too); without one, none: the scale is then a Python number.
        """
        scale = self._grad_scales[self.steps]
        if not isinstance(scale, Tensor):
            bad = not 0.0 < scale < math.inf
            if found_inf is None:
                return False, bad
            return bool(found_inf), bad
        parts = [(~torch.isfinite(scale) | (scale <= 0)).to(scale.dtype), scale]
        if found_inf is not None:
            parts.append(torch.as_tensor(found_inf).to(scale))
        values = torch.stack([p.reshape(()) for p in parts]).tolist()
        if not values[0]:
            self._warn_first_scale(values[1])
        return len(values) > 2 and bool(values[2]), bool(values[0])

    def _handle_silent_layers(self) -> None:
        """At the first step taken, hand layers whose forward never ran to the fallback."""
        self._silent_checked = True
        names = [layer.name for layer in self._layers if not layer.fired]
        if not names:
            return
        what = (
            "moved to the fallback optimizer"
            if self._fallback_factory is not None
            else "left untrained (fallback=None)"
        )
        warnings.warn(
            f"The forward of layer(s) {', '.join(names)} never ran (their owner uses the "
            f"weights directly); their parameters are {what}.",
            stacklevel=4,
        )
        self._move_to_fallback(names)

    def _step_layers(self) -> None:
        prev_scale, scale = self._grad_scales[self.steps - 1], self._grad_scales[self.steps]
        # Tensors (a GradScaler's, float64) stay on the device: never read.
        grad_unscaling = prev_scale / scale**2
        divisor = self._gradient_divisor()
        world = self._world()
        active = [layer for layer in self._layers if layer.module.weight.grad is not None]
        due = [
            layer
            for layer in active
            if layer.passes > 0 and self.steps % self.param_groups[layer.group_index]["T"] == 0
        ]
        if world > 1:
            # Each rank's scaler has its own scale: un-scale the output-side terms locally
            # before they are mixed, so every rank ends with the same, un-scaled sum.
            self._all_reduce_accumulators(due, grad_unscaling)
            grad_unscaling = 1.0
        for layer in due:
            self._update_preconditioner(layer, grad_unscaling)
            _reset_passes(layer)
        for layer in self._layers:
            if layer not in due:
                self._clear_accumulators(layer)
        directions = []
        for layer in active:
            # Inside DDP, a summed loss: DDP averaged the gradients, undo it.
            summed = self._ddp and self.param_groups[layer.group_index]["loss_average"] is None
            directions.append(self._layer_directions(layer, divisor, world if summed else 1.0))
        if world > 1 and not self._ddp:
            self._all_reduce_by_loss(active, directions)
        for layer, steps in zip(active, directions, strict=True):
            self._apply_update(layer, steps)

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
        if _not_one(divisor):
            grad.div_(divisor)
        if factor != 1.0:
            grad.mul_(factor)
        return split_matrix(layer, self._precondition(layer, grad))

    def _apply_update(self, layer: KroneckerLayer, steps: list[Tensor]) -> None:
        """``p <- p - lr * buf`` with ``buf = momentum * buf + (direction + wd * p)``."""
        group = self.param_groups[layer.group_index]
        weight_decay, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        # `steps` are the optimizer's own tensors, so weight decay goes in in place. The
        # foreach calls do per tensor exactly what `add_`/`mul_` do, in fewer dispatches.
        params = layer.params
        if weight_decay != 0.0:
            torch._foreach_add_(steps, params, alpha=weight_decay)
        if momentum != 0.0:
            states = [self.state[p] for p in params]
            old = [
                (state["momentum_buffer"], d)
                for state, d in zip(states, steps, strict=True)
                if "momentum_buffer" in state
            ]
            if old:
                torch._foreach_mul_([b for b, _ in old], momentum)
                torch._foreach_add_([b for b, _ in old], [d for _, d in old])
            for state, d in zip(states, steps, strict=True):
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone(memory_format=torch.contiguous_format)
            steps = [state["momentum_buffer"] for state in states]
        torch._foreach_add_(params, steps, alpha=-lr)

    def _step_fallback(self) -> None:
        if self.fallback is None:
            return
        divisor = self._gradient_divisor()
        world = self._world()
        grads = []
        for fgroup in self.fallback.param_groups:
            group = self.param_groups[fgroup["group_index"]]
            fgroup["lr"], fgroup["weight_decay"] = group["lr"], group["weight_decay"]
            for p in fgroup["params"]:
                if p.grad is None:
                    continue
                if _not_one(divisor):
                    p.grad.div_(divisor)
                if self._ddp and group["loss_average"] is None:
                    p.grad.mul_(world)
                grads.append((p.grad, group["loss_average"] is not None))
        if world > 1 and not self._ddp:
            for average in (True, False):
                _all_reduce_flat([g for g, avg in grads if avg is average], average)
        self.fallback.step()

    # ----------------------------------------------------------- distributed
    def _all_reduce_accumulators(self, layers: list[KroneckerLayer], grad_unscaling: Scale) -> None:
        """All-reduce the accumulated curvature terms of ``layers`` in one call per kind,
        output-side terms multiplied by ``grad_unscaling`` first."""
        entries = []  # (layer state, key, tensors, average?)
        for layer in layers:
            state = self._factors[layer.name]
            average_output = self.param_groups[layer.group_index]["loss_average"] is not None
            for key, side in self.ACCUMULATORS.items():
                value = state[key]
                if side == "output" and _not_one(grad_unscaling):
                    value.mul_(grad_unscaling)
                tensors = value.tensors() if isinstance(value, StructuredMatrix) else {"": value}
                entries.append((state, key, tensors, side == "input" or average_output))
        for average in (True, False):
            chosen = [e for e in entries if e[3] is average]
            _all_reduce_flat([t for e in chosen for t in e[2].values()], average)
            for state, key, tensors, _ in chosen:
                value = state[key]
                if isinstance(value, StructuredMatrix):
                    state[key] = type(value).from_tensors(value.dim, tensors)

    def _all_reduce_by_loss(
        self, layers: list[KroneckerLayer], directions: list[list[Tensor]]
    ) -> None:
        averaged = [
            self.param_groups[layer.group_index]["loss_average"] is not None for layer in layers
        ]
        for average in (True, False):
            chosen = [
                t for ts, a in zip(directions, averaged, strict=True) if a is average for t in ts
            ]
            _all_reduce_flat(chosen, average)

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
        layers = {}
        for layer in self._layers:
            saved = {}
            for key, value in self._factors[layer.name].items():
                if isinstance(value, StructuredMatrix):
                    saved[key] = {
                        "structure": value.name,
                        "dim": value.dim,
                        "tensors": dict(value.tensors()),
                    }
                else:
                    saved[key] = value
            layers[layer.name] = {
                "factors": saved,
                "passes": layer.passes,
                "backward_passes": layer.backward_passes,
                "fired": layer.fired,
                "skipped_steps": layer.skipped_steps,
            }
        state["kronecker"] = {
            "steps": self.steps,
            "grad_scales": {
                t: float(v) if isinstance(v, Tensor) else v for t, v in self._grad_scales.items()
            },
            "layers": layers,
            "fallback_layers": list(self._fallback_layers),
            "silent_checked": self._silent_checked,
            "fallback": None if self.fallback is None else self.fallback.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict`; callable hyperparameters keep their current value.

        Raises:
            ValueError: In one sentence, at the first way the checkpoint does not fit this
                optimizer and model (`singd.optim.checkpoint`); nothing is loaded then.
        """
        from singd.optim.checkpoint import check_state_dict  # needed only when loading

        check_state_dict(self, state_dict)
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
        self._grad_scales = dict(saved["grad_scales"])
        for layer in self._layers:
            entry = saved["layers"][layer.name]
            device = layer.module.weight.device
            factors = {}
            for key, value in entry["factors"].items():
                if isinstance(value, dict):
                    cls = get_structure(value["structure"])
                    # Copies, so the loaded optimizer never shares storage with the source.
                    tensors = {k: t.to(device, copy=True) for k, t in value["tensors"].items()}
                    factors[key] = cls.from_tensors(value["dim"], tensors)
                else:
                    factors[key] = value.to(device, copy=True)
            self._factors[layer.name] = factors
            layer.passes = entry["passes"]
            # Checkpoints from before calls and passes were told apart: one call each.
            layer.backward_passes = entry.get("backward_passes", entry["passes"])
            layer.fired = entry["fired"]
            layer.skipped_steps = entry["skipped_steps"]
        if self.fallback is not None and saved["fallback"] is not None:
            self.fallback.load_state_dict(saved["fallback"])

    # ----------------------------------------------------------- accounting
    def _tensor_bytes(self, state: dict[Any, dict[str, Any]]) -> int:
        return sum(
            t.numel() * t.element_size()
            for entry in state.values()
            for t in entry.values()
            if isinstance(t, Tensor)
        )

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state by category (B).

        ``param_buffers``: momentum buffers of the Kronecker-covered parameters;
        ``fallback``: tensors of the fallback optimizer's state; subclasses add their
        factor categories via `_factor_bytes`.
        """
        fallback = 0 if self.fallback is None else self._tensor_bytes(self.fallback.state)
        return {
            **self._factor_bytes(),
            "param_buffers": self._tensor_bytes(self.state),
            "fallback": fallback,
        }

    def _factor_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (calling it twice is harmless)."""
        for handle in self._handles:
            handle.remove()


def _all_reduce_flat(tensors: list[Tensor], average: bool) -> None:
    """Sum (or average) tensors over all ranks in place, one collective per dtype/device.

    gloo has no AVG reduction, so averages are sums divided by the world size.
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if average:
            flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
