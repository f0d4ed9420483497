"""SINGD's natural gradient from the rows of a linear layer's gradient, where cheaper.

A linear layer's weight gradient is the product of the rows the optimizer collects for
its curvature anyway: with ``a`` the input rows (``n x d_K``, the bias's ones column
appended, divided by ``sqrt(n)``, `singd.optim.layers.process_input`) and ``g`` the
output gradient's rows (``n x d_C``), autograd forms ``[dW | db] = sqrt(n) g^T a``. The
natural gradient ``C C^T G K K^T`` is then ``sqrt(n) (g C C^T)^T (a K K^T)``: four thin
products ``(n x d) (d x d)`` and one ``(d_C x n) (n x d_K)``, about
``4 n (d_K^2 + d_C^2) + 2 n d_K d_C`` FLOPs, where the dense path forms ``K K^T`` and
``C C^T`` and multiplies ``d x d`` matrices (about ``1.5 (d_K^3 + d_C^3) + 2 d_K d_C
(d_K + d_C)``). One thread, batch 128: a 512 x 513 layer's natural gradient took 0.37
of the dense path's time, a 512 x 257 one 0.5 (`benchmarks/test_singd_step.py` has the
whole step).

It is taken (`LowRank`) only where ``.grad`` is exactly that product, which the
optimizer checks without reading the device:

- both factors dense, a ``nn.Linear`` layer (not transposed, not a convolution),
  ``kfac_approx="expand"``, and the layer's input, output gradient and weight in one
  dtype (not under autocast, where autograd multiplies rounded copies);
- one process (no DDP, FSDP2 or other collectives: an all-reduce changes ``.grad``),
  ``precision=None``, no GradScaler ``unscale_`` before the step (it divides ``.grad``
  in place without marking it changed);
- the weight and bias held by this layer only (no tied parameters) and without tensor
  hooks, their ``.grad`` None when the layer's backward call begins, one backward call
  of the layer before the step (no accumulation, no reuse in one forward), and at the
  step the very ``.grad`` tensors autograd accumulated, unmodified since (their identity
  and version counters, recorded by a post-accumulate-grad hook): ``clip_grad_norm_``,
  ``p.grad = ...``, in-place arithmetic and ``zero_grad(set_to_none=False)`` all send
  the layer down the dense path;
- both sides at least `MIN_DIM` wide and the thin products at most `SAVING` of the dense
  path's FLOPs (with batch 128 the benchmark MLP's 512-wide layers qualify, its 10-wide
  output layer does not).

Not seen by these checks: writes through ``p.grad.data`` (which bypass the version
counter) and a functional use of ``layer.weight`` outside the layer's forward (whose
gradient autograd adds to ``.grad``). Code that does either should set ``ENABLED =
False``. The rows wait from the backward pass to the step: ``n (d_K + d_C)`` entries per
layer, less than the factors' ``d_K^2 + d_C^2`` wherever the path is taken.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from math import sqrt
from typing import TYPE_CHECKING

from torch import Tensor, nn

from singd.optim import distributed
from singd.optim.functional import singd_natural_gradient_from_rows
from singd.optim.hooks import graph_task_id
from singd.optim.layers import KroneckerLayer, output_rows
from singd.optim.scaling import Scale, not_one
from singd.structures.dense import DenseMatrix

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from singd.optim.singd import SINGD

ENABLED = True
"""Whether SINGD takes the low-rank natural gradient where it applies (False: never)."""

MIN_DIM = 128
"""Both sides of a layer at least this wide (smaller products are bound by overheads)."""

SAVING = 0.6
"""The thin products' FLOPs at most this share of the dense path's (thin products run at
a lower rate than square ones)."""


def dense_path_flops(dim_K: int, dim_C: int) -> float:
    """FLOPs of `singd.structures.dense.dense_outer_matmat` on both sides of a
    ``d_C x d_K`` gradient (``S S^T`` formed where that is cheaper)."""

    def side(dim: int, cols: int) -> float:
        formed = 1.5 * dim**3 + 2.0 * dim * dim * cols
        return formed if 4 * cols > 3 * dim else 4.0 * dim * dim * cols

    return side(dim_K, dim_C) + side(dim_C, dim_K)


def low_rank_flops(dim_K: int, dim_C: int, rows: int) -> float:
    """FLOPs of the natural gradient from ``rows`` rows (module docstring)."""
    return 4.0 * rows * (dim_K * dim_K + dim_C * dim_C) + 2.0 * rows * dim_K * dim_C


def pays(dim_K: int, dim_C: int, rows: int) -> bool:
    """Whether a layer's natural gradient is cheaper from ``rows`` rows (`MIN_DIM`,
    `SAVING`)."""
    return min(dim_K, dim_C) >= MIN_DIM and (
        low_rank_flops(dim_K, dim_C, rows) <= SAVING * dense_path_flops(dim_K, dim_C)
    )


@dataclass(eq=False)
class Rows:
    """One backward call's rows of a layer, and what autograd accumulated after it."""

    a: Tensor
    g: Tensor
    # Per parameter (weight, bias): the .grad autograd left and its version then (None
    # until the post-accumulate-grad hook has seen it).
    seen: list[tuple[weakref.ref, int] | None]


class LowRank:
    """Which layers' rows wait for the step, and the checks that say they may be used."""

    def __init__(self, optimizer: SINGD, module: nn.Module) -> None:
        self._optimizer = optimizer
        counts: dict[int, int] = {}
        for _, p in module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        # Layers whose parameters no other module holds (tied weights are not).
        self._own_params = {
            layer.name
            for layer in optimizer._layers
            if all(counts.get(id(p), 0) == 1 for p in layer.params)
        }
        self._pending: dict[str, Tensor] = {}
        self._rows: dict[str, Rows | None] = {}  # None: not this step
        self._hooked: dict[str, list[RemovableHandle]] = {}
        self.taken = 0  # low-rank natural gradients so far (tests read it)

    def _eligible(self, layer: KroneckerLayer) -> bool:
        optimizer = self._optimizer
        if not ENABLED or layer.name not in self._own_params:
            return False
        module = layer.module
        if type(module) is not nn.Linear or layer.transposed:
            return False
        state = optimizer._factors[layer.name]
        if not (
            isinstance(state.get("K"), DenseMatrix) and isinstance(state.get("C"), DenseMatrix)
        ):
            return False
        if optimizer._ddp or optimizer._sharded or optimizer._escalation is not None:
            return False
        if optimizer.param_groups[layer.group_index]["kfac_approx"] != "expand":
            return False
        task = graph_task_id()
        if task is None or task == -1:  # not inside a backward pass
            return False
        return distributed.world_size() == 1 and all(
            p.grad is None and not p._backward_hooks for p in layer.params
        )

    def offer_input(self, layer: KroneckerLayer, x: Tensor, a: Tensor) -> None:
        """A backward call's input ``x`` and its rows ``a``: kept if the layer qualifies."""
        self._pending.pop(layer.name, None)
        if (
            layer.passes == 0
            and layer.name not in self._rows
            and x.dtype == layer.module.weight.dtype
            and self._eligible(layer)
            and pays(layer.dim_K, layer.dim_C, a.shape[0])
        ):
            self._pending[layer.name] = a

    def offer_output(self, layer: KroneckerLayer, grad: Tensor) -> None:
        """The same call's output gradient: with its input's rows, they wait for the
        step; a second call of the layer before the step ends the layer's chance."""
        a = self._pending.pop(layer.name, None)
        if layer.passes > 0 or layer.name in self._rows:
            self._rows[layer.name] = None
            return
        if a is None or grad.dtype != layer.module.weight.dtype:
            return
        g = output_rows(grad, layer, "expand")
        if g.shape[0] != a.shape[0]:
            return
        self._rows[layer.name] = Rows(a, g, [None] * len(layer.params))
        if layer.name not in self._hooked:
            self._hooked[layer.name] = [
                p.register_post_accumulate_grad_hook(self._accumulated_hook(layer.name, i))
                for i, p in enumerate(layer.params)
            ]

    def _accumulated_hook(self, name: str, index: int):
        rows_of = self._rows

        def record(param: Tensor) -> None:
            rows = rows_of.get(name)
            if rows is None:
                return
            if rows.seen[index] is not None:  # a second accumulation: not one product
                rows_of[name] = None
                return
            rows.seen[index] = (weakref.ref(param.grad), param.grad._version)

        return record

    def natural_gradient(
        self, layer: KroneckerLayer, divisor: Scale, factor: float
    ) -> Tensor | None:
        """The layer's ``C C^T ([dW | db] / divisor * factor) K K^T`` from its rows (in
        ``.grad``'s dtype), or None where the checks say ``.grad`` may not be their
        product (the caller takes the dense path). The rows are dropped either way."""
        rows = self._rows.pop(layer.name, None)
        if rows is None or getattr(self._optimizer, "grad_scale", 1.0) is None:
            return None  # (grad_scale None: GradScaler.unscale_ changed .grad in place)
        for p, seen in zip(layer.params, rows.seen, strict=True):
            if seen is None or p.grad is not seen[0]() or p.grad._version != seen[1]:
                return None
        scale = sqrt(rows.a.shape[0]) * factor
        if not_one(divisor):
            scale = scale / divisor
        state = self._optimizer._factors[layer.name]
        nat = singd_natural_gradient_from_rows(state["K"], state["C"], rows.a, rows.g, scale)
        self.taken += 1
        return nat.to(layer.module.weight.grad.dtype)

    def nbytes(self) -> int:
        """Bytes of the rows waiting for the step (counted with the accumulators)."""
        return sum(r.a.nbytes + r.g.nbytes for r in self._rows.values() if r is not None)

    def drop(self, layer: KroneckerLayer | None = None) -> None:
        """Forget one layer's rows (all layers' with None): after its step or a skip."""
        if layer is None:
            self._pending.clear()
            self._rows.clear()
        else:
            self._pending.pop(layer.name, None)
            self._rows.pop(layer.name, None)

    def remove_hooks(self) -> None:
        """Detach the post-accumulate-grad hooks (`SINGD.remove_hooks`)."""
        for handles in self._hooked.values():
            for handle in handles:
                handle.remove()
        self._hooked.clear()
