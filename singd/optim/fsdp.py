"""Kronecker optimizers on models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a DTensor holding one shard (by default rows, ``Shard(0)``,
on a one-dimensional mesh), but the forward and backward passes run on the unsharded
parameters, each rank on its own slice of the batch. So, as under DDP:

- the layer hooks see this rank's inputs and output gradients;
- FSDP has already averaged the gradients over ranks (reduce-scatter): they are not
  reduced again; a summed loss (``loss_average=None``) multiplies them by the world
  size, as inside DDP.

What differs is the gradient: each rank holds a shard of ``[dW | db]``, and the output
side of the preconditioner (``C`` of SINGD, ``G^-1`` of KFAC) mixes its rows, the input
side its columns; the full gradient is needed whatever the placement (rows, columns
with ``shard_placement_fn``).

- One rank (world size 1): `sharded_directions` gathers each Kronecker layer's full
  gradient (``DTensor.full_tensor``), preconditions it and keeps the parameter's shard
  of the result (`to_shard`, a local slice).
- Several ranks: each layer's second-order state lives on one rank, its owner
  (`assign_owners`: `balance` by `layer_state_bytes`). The curvature terms are reduced
  to the owner (`singd.optim.distributed.all_reduce_accumulators` with ``owners``);
  SINGD's owners lend ``K`` and ``C`` for a curvature step's passes (`lend_factors`),
  since SINGD's terms are taken in them; `owned_directions` gathers the gradient on
  every rank, the owner preconditions it and broadcasts the direction, and each rank
  keeps its shard.

Communication per step and per rank, for ``P`` ranks and ``b`` bytes per element
(docs/distributed.md has the figures for a transformer): the gradient all-gather,
``(P - 1)/P * d_C * d_K * b`` per layer (a plain all-gather of each layer's gradient),
and as much again for the owner's broadcast of the direction; every ``T`` steps, the
curvature terms reduced to their owners and, for SINGD, the lent ``K`` and ``C``.

What cannot be preconditioned is refused at construction (`check_sharding`): a layer
whose weight stays sharded in its own forward (tensor parallelism: the hooks would see
a shard of the activations), and plain (unsharded) parameters of an FSDP model, whose
gradients FSDP does not average; and at the first step (`check_weights_kept`), an
optimizer built before ``fully_shard`` replaced the parameters it holds.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from singd.optim.layers import KroneckerLayer
from singd.optim.scaling import Scale
from singd.structures import get_structure

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from singd.optim.base import KroneckerOptimizer


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor, without importing torch.distributed.tensor (a second
    of start-up): where nobody imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(param_groups: list[dict[str, Any]]) -> bool:
    """Whether any optimized parameter is a DTensor (a model sharded with FSDP2)."""
    return any(is_dtensor(p) for g in param_groups for p in g["params"])


def _fsdp_managed(module: nn.Module) -> set[int]:
    """ids of the parameters of ``module`` that some ``fully_shard`` call shards: those
    of every FSDPModule in it (nested ones included)."""
    from torch.distributed.fsdp import FSDPModule

    return {
        id(p)
        for sub in module.modules()
        if isinstance(sub, FSDPModule)
        for p in sub.parameters()
        if is_dtensor(p)
    }


def check_sharding(module: nn.Module, param_groups: list[dict[str, Any]]) -> bool:
    """Whether the optimized parameters are FSDP2 shards; raise where they cannot be
    trained correctly.

    Returns:
        True for a sharded model (every optimized parameter a DTensor that
        ``fully_shard`` manages), False for a model without DTensor parameters.

    Raises:
        ValueError: One sentence naming the first parameter that is a DTensor not
            managed by ``fully_shard`` (its forward would run on a shard), that is
            sharded over more than one mesh dimension (tensor parallelism inside FSDP),
            or that is a plain tensor in an otherwise sharded model (FSDP would not
            average its gradient across ranks).
    """
    if not is_sharded(param_groups):
        return False
    from torch.distributed.tensor import Replicate, Shard

    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    managed = _fsdp_managed(module)
    for group in param_groups:
        for p in group["params"]:
            name = names.get(id(p), "<a parameter outside the model>")
            if not is_dtensor(p):
                raise ValueError(
                    f"Parameter {name!r} is a plain tensor in a model sharded with "
                    "fully_shard, so nothing averages its gradient across ranks; shard "
                    "it with fully_shard (on its module or an ancestor) or leave it out "
                    "of the optimized parameters."
                )
            shards = [pl for pl in p.placements if isinstance(pl, Shard)]
            others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
            if id(p) not in managed or len(shards) > 1 or others:
                raise ValueError(
                    f"Parameter {name!r} is a DTensor with placements {p.placements} that "
                    "fully_shard does not gather for the forward pass (tensor "
                    "parallelism?), so its layer's hooks would see a shard of the "
                    "activations; the Kronecker optimizers support FSDP2 sharding "
                    "(one Shard placement, optionally beside Replicate) only."
                )
    return True


def check_weights_kept(layers: list[KroneckerLayer], weights: dict[str, Tensor]) -> None:
    """Raise where a layer's weight is no longer the tensor the optimizer was built with
    (checked at the first step): ``fully_shard`` called after building the optimizer
    replaces every parameter, which the optimizer would then never update.

    Raises:
        ValueError: One sentence naming the first such layer.
    """
    for layer in layers:
        if layer.module.weight is not weights[layer.name]:
            raise ValueError(
                f"The weight of layer {layer.name!r} was replaced after the optimizer was "
                "built (fully_shard called after it?); build the optimizer after sharding "
                "the model."
            )


def _full_view(layer: KroneckerLayer, grads: list[Tensor]) -> KroneckerLayer:
    """A stand-in for ``layer`` whose parameters are the full gradients' holders: what
    `singd.optim.layers.gradient_matrix` and the directions read (``.grad``, ``.shape``)."""
    holders = [SimpleNamespace(grad=g, shape=g.shape) for g in grads]
    view = KroneckerLayer(
        name=layer.name,
        module=SimpleNamespace(weight=holders[0], bias=holders[1] if layer.has_bias else None),
        group_index=layer.group_index,
        has_bias=layer.has_bias,
        dim_K=layer.dim_K,
        dim_C=layer.dim_C,
    )
    view.transposed = layer.transposed
    return view


def to_shard(full: Tensor, like: DTensor) -> DTensor:
    """This rank's shard of ``full`` (the same on every rank), placed as ``like``: a local
    slice, no communication."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


def sharded_directions(
    optimizer: KroneckerOptimizer, layer: KroneckerLayer, divisor: Scale, factor: float
) -> list[DTensor]:
    """The preconditioned gradient of each of the layer's (sharded) parameters, as the
    parameter's own shard: the full gradient gathered, preconditioned as in one process
    (`KroneckerOptimizer._layer_directions`), and sliced."""
    params = layer.params
    grads = [p.grad.full_tensor() for p in params]
    full = optimizer._layer_directions(_full_view(layer, grads), divisor, factor)
    return [to_shard(d, p) for d, p in zip(full, params, strict=True)]


# ------------------------------------------------------------------ sharded state
def balance(sizes: list[int], world: int) -> list[int]:
    """The rank owning each item: the largest first (ties: the earlier item), each to the
    rank holding the fewest bytes so far (ties: the lowest rank). Every rank then holds
    at most ``sum(sizes) / world + max(sizes)`` (the greedy's bound)."""
    loads = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world), key=lambda r: loads[r])
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def layer_state_bytes(optimizer: KroneckerOptimizer, layer: KroneckerLayer) -> int:
    """Bytes of the layer's second-order state in one process (what its owner holds):
    SINGD's ``K``, ``C`` (and ``m_K``, ``m_C`` with Riemannian momentum) in their
    structures; KFAC's dense ``A``, ``G`` and their inverses."""
    group = optimizer.param_groups[layer.group_index]
    dtypes = optimizer._configured_dtypes(layer)
    sizes = [torch.empty((), dtype=d, device="meta").element_size() for d in dtypes]
    if "structures" not in group:  # KFAC
        return 2 * (layer.dim_K**2 * sizes[0] + layer.dim_C**2 * sizes[1])
    K, C = (get_structure(name) for name in group["structures"])
    copies = 2 if group["alpha1"] != 0.0 else 1
    return copies * (
        K.storage_entries(layer.dim_K) * sizes[0] + C.storage_entries(layer.dim_C) * sizes[1]
    )


def assign_owners(optimizer: KroneckerOptimizer) -> dict[str, int]:
    """Layer name -> the rank that holds its second-order state (`balance` by
    `layer_state_bytes`); the same on every rank (shapes and settings only)."""
    layers = optimizer._layers
    sizes = [layer_state_bytes(optimizer, layer) for layer in layers]
    owners = balance(sizes, dist.get_world_size())
    return {layer.name: rank for layer, rank in zip(layers, owners, strict=True)}


LENT_FACTORS = ("K", "C")
"""The factors SINGD's hooks read: lent by each layer's owner for a curvature step."""


def lend_factors(optimizer: KroneckerOptimizer) -> None:
    """Before a curvature step's forward pass (a forward pre-hook on the model): every
    layer's owner broadcasts the factors its hooks read (SINGD's ``K`` and ``C``, which
    the curvature terms are taken in), so the other ranks can form their terms; they are
    dropped at the step (`KroneckerOptimizer._step_layers`). KFAC's terms need none."""
    if optimizer._lent_at == optimizer.steps:  # once per step (gradient accumulation)
        return
    optimizer._lent_at = optimizer.steps
    rank = dist.get_rank()
    for layer in optimizer._layers:
        group = optimizer.param_groups[layer.group_index]
        state = optimizer._factors[layer.name]
        lent = LENT_FACTORS if "structures" in group else ()  # SINGD: K and C
        if not lent or optimizer.steps % group["T"] != 0:
            continue
        owner = optimizer._owners[layer.name]
        structures = [get_structure(name) for name in group["structures"]]
        dtypes = optimizer._configured_dtypes(layer)
        device = optimizer._weights[layer.name].device
        for key, cls, dim, dtype in zip(
            lent, structures, (layer.dim_K, layer.dim_C), dtypes, strict=True
        ):
            matrix = state[key] if rank == owner else cls.zeros(dim, dtype=dtype, device=device)
            tensors = matrix.tensors()
            for t in tensors.values():  # the receivers' zeros are contiguous
                dist.broadcast(t if t.is_contiguous() else t.contiguous(), src=owner)
            if rank != owner:
                state[key] = cls.from_tensors(dim, dict(tensors))


def owned_directions(
    optimizer: KroneckerOptimizer, layer: KroneckerLayer, divisor: Scale, factor: float
) -> list[DTensor]:
    """As `sharded_directions` where each layer's state lives on its owner only: every
    rank gathers the full gradient, the owner preconditions it and broadcasts the result,
    each rank keeps its shard."""
    params = layer.params
    grads = [p.grad.full_tensor() for p in params]
    owner = optimizer._owners[layer.name]
    if dist.get_rank() == owner:
        # Contiguous: a collective sends a tensor's storage (the bias is a column view).
        directions = optimizer._layer_directions(_full_view(layer, grads), divisor, factor)
        full = [d.contiguous() for d in directions]
    else:
        full = grads  # overwritten by the broadcast: the same shapes and dtypes
    for d in full:
        dist.broadcast(d, src=owner)
    return [to_shard(d, p) for d, p in zip(full, params, strict=True)]
