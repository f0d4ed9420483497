"""The layer hooks that collect a Kronecker optimizer's curvature terms.

A forward hook hooks the gradient of the layer's output (a pre-hook on the output's
autograd node, or a tensor hook), which receives the output gradient during backward.
Full backward hooks break on in-place activations; these do not. The hooks are attached
for the steps with ``steps % T == 0`` only (`LayerHooks`).

The backward hook reduces the input and the output gradient to what the optimizer's
curvature needs (`_reduce_input`, `_reduce_output`: by default the rows ``a`` and ``g`` of
`singd.optim.layers`, ``a`` reduced to `_input_statistic`, ``g`` divided by
``sqrt(s_{t-1})``, the previous step's GradScaler scale, `singd.optim.scaling`) and
passes both to `_accumulate` (one call per backward call of the layer, so gradient
accumulation over several passes, and a layer run several times per forward, sum their
curvature terms; `KroneckerLayer.passes` counts the calls and ``backward_passes`` the
distinct backward passes).

The input itself waits for the backward pass, where autograd keeps it anyway for the
weight's gradient. But where saved-tensor hooks manage what autograd keeps (activation
checkpointing, ``torch.autograd.graph.save_on_cpu``), a kept input is one they would
free or move: there, if the statistic is at most 1/`EAGER_INPUT_RATIO` of the input's
size (diagonal, block-diagonal or hierarchical factors; dense ones over many rows), the
forward hook reduces the input at once and only the statistic waits. On four
checkpointed transformer MLP blocks with diagonal factors
(`benchmarks/test_checkpoint_memory.py`) checkpointing saved 2% of an update step's peak
tensor memory while the inputs waited, and saves 41% now (AdamW: 42%). Not done
everywhere: in the forward the same work costs more (on this CPU, an MLP 256-512-512-10
with diagonal factors and T=1: the forward gained 374 us, the backward lost 309, about
1% of the step). A segment's recomputation in the backward pass keeps its input: it is
short-lived there.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from singd.optim.layers import KroneckerLayer

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from singd.optim.base import KroneckerOptimizer

EAGER_INPUT_RATIO = 8
"""Under saved-tensor hooks, the forward hook reduces a layer's input to its statistic at
once where the statistic has at most 1/8 of the input's entries (see the module
docstring): the statistic then costs at most an eighth of the input while it waits for
the backward pass."""

_CURRENT_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)
_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def graph_task_id() -> int | None:
    """The autograd engine's id of the backward pass now running (one per
    ``backward()`` call), or None where this torch does not tell it; then every call of
    a layer counts as a pass of its own."""
    return None if _CURRENT_GRAPH_TASK is None else _CURRENT_GRAPH_TASK()


def saved_tensors_managed() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, ``save_on_cpu``) manage what
    autograd keeps for the backward pass; True where this torch does not tell. False
    while torch.compile traces the hook (dynamo cannot trace the query; a compiled graph
    does its own checkpointing)."""
    if torch.compiler.is_compiling():
        return False
    return _SAVED_TENSORS_HOOKS is None or _SAVED_TENSORS_HOOKS(False) is not None


def reset_passes(layer: KroneckerLayer) -> None:
    """Forget the layer's backward calls and passes (after an update or a skipped step)."""
    layer.passes = layer.backward_passes = 0
    layer.graph_task = -1


class LayerHooks:
    """The layers' forward hooks, attached only for the steps that collect curvature.

    A step whose number is not a multiple of its layer's T runs the layer without a hook
    at all (an attached hook, even one that returns at once, costs the module its fast
    call path). `sync` runs after every step, when the optimizer knows the next step's
    number; until the first step has checked which layers ran (``fired``), every hook
    stays attached. A change of T takes effect for hooking at the next `sync`.
    """

    def __init__(self, optimizer: KroneckerOptimizer, layers: list[KroneckerLayer]) -> None:
        self._optimizer = optimizer
        self._handles: dict[KroneckerLayer, RemovableHandle] = {}
        self._removed = False
        self.sync(layers)

    def sync(self, layers: list[KroneckerLayer]) -> None:
        """Attach the hook of each layer whose next step collects curvature; detach the
        others' (nothing once `remove` ran)."""
        optimizer = self._optimizer
        for layer in [] if self._removed else layers:
            T = optimizer.param_groups[layer.group_index]["T"]
            needed = not optimizer._silent_checked or optimizer.steps % T == 0
            handle = self._handles.get(layer)
            if needed and handle is None:
                self._handles[layer] = layer.module.register_forward_hook(
                    partial(forward_hook, optimizer, layer)
                )
            elif handle is not None and not needed:
                del self._handles[layer]
                handle.remove()

    def detach(self, layer: KroneckerLayer) -> None:
        """Detach one layer's hook for good (a layer handed to the fallback optimizer)."""
        handle = self._handles.pop(layer, None)
        if handle is not None:
            handle.remove()

    def remove(self) -> None:
        """Detach every hook for good (calling it twice is harmless)."""
        self._removed = True
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def forward_hook(
    optimizer: KroneckerOptimizer,
    layer: KroneckerLayer,
    module: nn.Module,
    inputs: tuple,
    output: Tensor,
) -> None:
    """Mark the layer as run and, on a curvature step, hook its output's gradient."""
    layer.fired = True
    if not (torch.is_grad_enabled() and output.requires_grad):
        return
    if optimizer.steps % optimizer.param_groups[layer.group_index]["T"] != 0:
        return
    x = inputs[0].detach()
    task = graph_task_id()
    recomputing = task is not None and task != -1  # a checkpointed segment, again
    if (
        recomputing
        or not saved_tensors_managed()
        or optimizer._input_statistic_entries(layer) * EAGER_INPUT_RATIO > x.numel()
    ):
        # A reentrant checkpoint backpropagates each recomputed segment in a backward
        # pass of its own, nested in the one that recomputes it: that outer pass is
        # the one the layer's gradient belongs to.
        _hook_gradient(output, partial(backward_hook, optimizer, layer, x, None, task))
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
        statistic = optimizer._reduce_input(layer, x)
    _hook_gradient(output, partial(backward_hook, optimizer, layer, None, statistic, None))


def _hook_gradient(output: Tensor, hook) -> None:
    """Call ``hook(grad)`` with the gradient of ``output`` during backward.

    A pre-hook on the autograd node that made ``output`` (its first output) receives the
    same gradient as a tensor hook on ``output``, at about half the registration cost;
    and an in-place operation on ``output`` afterwards (``ReLU(inplace=True)``) leaves it
    on the layer's own node. Any other output takes a tensor hook.
    """
    node = output.grad_fn
    if node is not None and output.output_nr == 0 and not torch.compiler.is_compiling():
        node.register_prehook(partial(_first_gradient, hook))
    else:
        output.register_hook(hook)


def _first_gradient(hook, grad_outputs: tuple) -> None:
    if grad_outputs[0] is not None:
        hook(grad_outputs[0])


def backward_hook(
    optimizer: KroneckerOptimizer,
    layer: KroneckerLayer,
    x: Tensor | None,
    statistic: Any,
    outer_task: int | None,
    grad: Tensor,
) -> None:
    """Accumulate one backward call's curvature terms and count the call and its pass."""
    # A backward pass runs its hooks without grad mode unless it builds a graph
    # (``create_graph=True``): only then is a ``no_grad`` block needed (and paid for).
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
        if statistic is None:
            statistic = optimizer._reduce_input(layer, x)
        grad = grad.detach() if grad.requires_grad else grad  # a graph only with create_graph
        optimizer._accumulate(layer, statistic, optimizer._reduce_output(layer, grad))
    layer.passes += 1
    task = outer_task if outer_task is not None and outer_task != -1 else graph_task_id()
    if task is None or task != layer.graph_task:
        layer.backward_passes += 1
        layer.graph_task = -1 if task is None else task
