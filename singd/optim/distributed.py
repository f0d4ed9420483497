"""The torch.distributed collectives of a Kronecker optimizer (world size > 1).

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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from singd.optim.scaling import Scale, not_one
from singd.structures.base import StructuredMatrix

State = dict[str, StructuredMatrix | Tensor]


def world_size() -> int:
    """The number of ranks; 1 where torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank; 0 where torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def all_reduce_flat(tensors: list[Tensor], average: bool, dst: int | None = None) -> None:
    """Sum (or average) tensors over all ranks in place, one collective per dtype/device;
    with ``dst``, onto that rank only (a reduce: the others' tensors are left undefined).

    gloo has no AVG reduction, so averages are sums divided by the world size.
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if dst is None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:
            dist.reduce(flat, dst=dst, op=dist.ReduceOp.SUM)
        if average:
            flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_split(tensors: list[Tensor], averaged: list[bool]) -> None:
    """All-reduce ``tensors`` in place: averaged where ``averaged`` says so, else summed."""
    for average in (True, False):
        chosen = [t for t, a in zip(tensors, averaged, strict=True) if a is average]
        all_reduce_flat(chosen, average)


def all_reduce_accumulators(
    states: list[State],
    sides: dict[str, str],
    average_output: list[bool],
    grad_unscaling: Scale,
    owners: list[int] | None = None,
) -> None:
    """All-reduce the accumulated curvature terms of each layer's state in one call per
    kind, output-side terms multiplied by ``grad_unscaling`` first; with ``owners``,
    reduce each layer's terms to its owner only (one call per owner and kind).

    Args:
        states: Each layer's state, holding the accumulators named in ``sides``;
            structured accumulators are replaced by their all-reduced copies.
        sides: Accumulator key -> ``"input"`` (always averaged) or ``"output"``.
        average_output: Per layer, whether its output side is averaged (a mean loss)
            rather than summed.
        grad_unscaling: The factor that un-scales this rank's output-side terms.
        owners: Per layer, the rank that receives its terms (sharded state), or None.
    """
    entries = []  # (layer state, key, tensors, average?, owner)
    owners = owners or [None] * len(states)
    for state, average, owner in zip(states, average_output, owners, strict=True):
        for key, side in sides.items():
            value = state[key]
            if side == "output" and not_one(grad_unscaling):
                value.mul_(grad_unscaling)
            tensors = value.tensors() if isinstance(value, StructuredMatrix) else {"": value}
            entries.append((state, key, tensors, side == "input" or average, owner))
    for average, owner in dict.fromkeys((e[3], e[4]) for e in entries):
        chosen = [e for e in entries if e[3] is average and e[4] == owner]
        all_reduce_flat([t for e in chosen for t in e[2].values()], average, owner)
        for state, key, tensors, _, _ in chosen:
            value = state[key]
            if isinstance(value, StructuredMatrix):
                state[key] = type(value).from_tensors(value.dim, tensors)


def agree_found_inf(found_inf: Tensor | float, device: torch.device) -> Tensor:
    """Every rank's GradScaler verdict, MAX-reduced: each rank's scaler saw only its own
    gradients, and ranks that disagreed on skipping would call different collectives and
    hang. On the parameters' ``device``: NCCL reduces CUDA tensors only."""
    found_inf = torch.as_tensor(found_inf, device=device).reshape(1).float()
    dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    return found_inf
