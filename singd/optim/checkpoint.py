"""Checkpoints of the Kronecker optimizers: what they hold per layer, and their checks.

`saved_layers` and `restore_layers` are the per-layer part of
`KroneckerOptimizer.state_dict` / ``load_state_dict``: each factor as plain tensors (a
structured matrix as its structure's name, dimension and stored tensors), so
``torch.load(..., weights_only=True)`` reads a checkpoint, plus the layer's pass counters.

A checkpoint is checked against the SINGD or KFAC optimizer that is about to load it.

``load_state_dict`` calls `check_state_dict` before it changes anything: the entries
`KroneckerOptimizer.state_dict` writes must be there, of the optimizer's kind (SINGD's
factors K, C, m_K, m_C, H_K, H_C or KFAC's A, G, their inverses and batch sums), with the
structure, dimension, shape and dtype this optimizer uses for each layer; the parameters'
own state (momentum buffers, the fallback's moments) must have the parameters' shapes.
Under ``precision="auto"`` a factor may be in any dtype its configured one widens to
(`singd.optim.precision.widenings`): escalated factors resume in their dtypes.
The first mismatch is named in one sentence (a ValueError), so a checkpoint of a wider
model, of the other optimizer, of another structure or no checkpoint at all never loads
into a state that fails at the next step, or quietly changes the configuration.

Distributed checkpoints (``torch.distributed.checkpoint``, DCP): `dcp_state_dict` gives
the optimizer's ``state_dict`` as DCP saves it (every tensor in one flat table, the rest
as one ``skeleton`` object), to save beside the model's::

    dcp.save({"model": model.state_dict(), "optimizer": dcp_state_dict(optimizer)}, ...)

and `load_dcp` loads it back into an optimizer at any world size: first the skeleton,
then every tensor into a buffer shaped as this process holds it (the parameter's own
DTensor shard for momentum buffers and the fallback's moments on a sharded model, a
whole tensor otherwise), then through ``load_state_dict`` and its checks. Momentum
buffers are written as shards by the ranks holding them; the factors, the same on every
rank, are written once. The parameter state is matched by its index in the parameter
groups, which ``fully_shard`` keeps, so a checkpoint of two ranks loads into one process
and the other way round (tests/singd/test_fsdp_checkpoint.py).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from singd.curvature import KFAC_ROLES, SINGD_ROLES
from singd.optim.precision import widenings
from singd.structures import get_structure
from singd.structures.base import StructuredMatrix

if TYPE_CHECKING:
    from singd.optim.base import KroneckerOptimizer
    from singd.optim.layers import KroneckerLayer

ROLES = {"SINGD": SINGD_ROLES, "KFAC": KFAC_ROLES}
ACCUMULATOR_SIDES = {
    "SINGD": {"H_K": "input", "H_C": "output"},
    "KFAC": {"A_batch": "input", "G_batch": "output"},
}
"""Each kind's accumulators (the subclasses' ``ACCUMULATORS``), which have no role."""

FACTOR_SIDES = {
    kind: {
        name: 0 if side == "input" else 1
        for name, side in ({n: r.side for n, r in roles.items()} | ACCUMULATOR_SIDES[kind]).items()
    }
    for kind, roles in ROLES.items()
}
"""Each kind's factors and their side: 0 the input side (d_K), 1 the output side (d_C)."""

INVERSES = {name for name, role in KFAC_ROLES.items() if role.kind == "inverse"}
"""Factors whose dtype is the inversion's, not the curvature's: any floating dtype."""


def saved_layers(optimizer: KroneckerOptimizer) -> dict[str, dict[str, Any]]:
    """Each layer's factors (plain tensors) and counters, by layer name: of the layers this
    rank owns (`KroneckerOptimizer.owns`: all but on a model sharded over ranks)."""
    layers = {}
    for layer in filter(optimizer.owns, optimizer._layers):
        factors = {}
        for key, value in optimizer._factors[layer.name].items():
            if isinstance(value, StructuredMatrix):
                factors[key] = {
                    "structure": value.name,
                    "dim": value.dim,
                    "tensors": dict(value.tensors()),
                }
            else:
                factors[key] = value
        layers[layer.name] = {
            "factors": factors,
            "passes": layer.passes,
            "backward_passes": layer.backward_passes,
            "fired": layer.fired,
            "skipped_steps": layer.skipped_steps,
        }
    return layers


def restore_layers(optimizer: KroneckerOptimizer, layers: dict[str, dict[str, Any]]) -> None:
    """Set each layer's factors and counters from `saved_layers`' output (checked before),
    of the layers this rank owns.

    The factors are copies on the layer's device, so the loaded optimizer never shares
    storage with the source.
    """
    for layer in filter(optimizer.owns, optimizer._layers):
        entry = layers[layer.name]
        device = layer.module.weight.device
        factors = {}
        for key, value in entry["factors"].items():
            if isinstance(value, dict):
                cls = get_structure(value["structure"])
                tensors = {k: t.to(device, copy=True) for k, t in value["tensors"].items()}
                factors[key] = cls.from_tensors(value["dim"], tensors)
            else:
                factors[key] = value.to(device, copy=True)
        optimizer._factors[layer.name] = factors
        layer.passes = entry["passes"]
        # Checkpoints from before calls and passes were told apart: one call each.
        layer.backward_passes = entry.get("backward_passes", entry["passes"])
        layer.fired = entry["fired"]
        layer.skipped_steps = entry["skipped_steps"]


def kind_of(optimizer: KroneckerOptimizer) -> str:
    """``SINGD`` (IKFAC and INGD included) or ``KFAC``."""
    return "SINGD" if "H_K" in optimizer.ACCUMULATORS else "KFAC"


def check_state_dict(optimizer: KroneckerOptimizer, state_dict: Any) -> None:
    """Raise a one-sentence ValueError at the first way ``state_dict`` does not fit.

    Args:
        optimizer: The SINGD or KFAC optimizer that will load it.
        state_dict: What was passed to ``load_state_dict``.
    """
    kind = kind_of(optimizer)
    problem = _first_problem(optimizer, kind, state_dict)
    if problem is not None:
        raise ValueError(f"Cannot load this checkpoint into {kind}: {problem}.")


def _first_problem(optimizer: KroneckerOptimizer, kind: str, state_dict: Any) -> str | None:
    if not isinstance(state_dict, Mapping):
        return f"it is a {type(state_dict).__name__}, not a state_dict"
    missing = [k for k in ("state", "param_groups", "kronecker") if k not in state_dict]
    if missing:
        return (
            f"it has no {missing[0]!r} entry, so it is not a state_dict of SINGD or KFAC "
            f"(its keys: {sorted(map(str, state_dict))})"
        )
    saved = state_dict["kronecker"]
    if (
        not isinstance(saved, Mapping)
        or not isinstance(saved.get("layers"), Mapping)
        or not isinstance(saved.get("fallback_layers"), list)
    ):
        return "its 'kronecker' entry has no 'layers' table or 'fallback_layers' list"
    fallback = set(optimizer._fallback_layers)
    current = {layer.name for layer in optimizer._layers} | fallback
    required = {layer.name for layer in optimizer._layers if optimizer.owns(layer)} | fallback
    known = set(saved["layers"]) | set(saved["fallback_layers"])
    if not required <= known <= current:  # all but a sharded state's: required == current
        return (
            f"it covers layers {sorted(map(str, known))} but this optimizer covers "
            f"{sorted(current)}; "
            "load it into an optimizer built on the same model"
        )
    groups = state_dict["param_groups"]
    own_groups = len(optimizer.param_groups)
    if not isinstance(groups, list) or len(groups) != own_groups:
        found = len(groups) if isinstance(groups, list) else type(groups).__name__
        return f"it has {found} parameter groups where this optimizer has {own_groups}"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    problem = _param_state_problem("", state_dict["state"], params)
    for layer in filter(optimizer.owns, optimizer._layers):
        if problem is None and layer.name in saved["layers"]:
            problem = _layer_problem(optimizer, kind, layer, saved["layers"][layer.name])
    fallback = saved.get("fallback")
    if problem is None and optimizer.fallback is not None and isinstance(fallback, Mapping):
        fallback_params = [p for g in optimizer.fallback.param_groups for p in g["params"]]
        problem = _param_state_problem("fallback ", fallback.get("state", {}), fallback_params)
    kfac = state_dict.get("kfac")
    if (
        problem is None
        and kind == "KFAC"
        and not (
            isinstance(kfac, Mapping)
            and isinstance(kfac.get("failed_decompositions"), Mapping)
            and isinstance(kfac.get("damping_used"), Mapping)
        )
    ):
        return "it has no 'kfac' entry with KFAC's counters (failed_decompositions, damping_used)"
    return problem


def _param_state_problem(where: str, state: Any, params: list[Tensor]) -> str | None:
    """A parameter's saved state (momentum, moments) whose shape is not the parameter's."""
    if not isinstance(state, Mapping):
        return f"its {where}'state' entry is a {type(state).__name__}, not a table"
    for index, entry in state.items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"its {where}state names parameter {index!r}, of {len(params)}"
        for key, value in entry.items() if isinstance(entry, Mapping) else ():
            shape = tuple(params[index].shape)
            if isinstance(value, Tensor) and value.ndim and tuple(value.shape) != shape:
                return (
                    f"{where}parameter {index} has shape {shape} but its {key!r} in the "
                    f"checkpoint has shape {tuple(value.shape)} (a checkpoint of another model)"
                )
    return None


def _layer_problem(
    optimizer: KroneckerOptimizer, kind: str, layer: KroneckerLayer, entry: Any
) -> str | None:
    factors = entry.get("factors") if isinstance(entry, Mapping) else None
    if not isinstance(factors, Mapping):
        return f"layer {layer.name!r} has no 'factors' table"
    own = FACTOR_SIDES[kind]
    for key in factors:
        if key not in own:
            other = next((k for k, sides in FACTOR_SIDES.items() if key in sides), None)
            if other is not None and other != kind:
                return (
                    f"it holds {other} state (layer {layer.name!r} has factor {key!r}); "
                    f"load it into {other}"
                )
            return f"layer {layer.name!r} has factor {key!r}, which {kind} does not keep"
    if kind == "SINGD":
        group = optimizer.param_groups[layer.group_index]
        required = {"K", "C"} | ({"m_K", "m_C"} if group["alpha1"] != 0.0 else set())
        optional = set(optimizer.ACCUMULATORS)
        missing = sorted(required - set(factors))
        if missing:
            return f"layer {layer.name!r} has no factor {missing[0]!r}, which this {kind} keeps"
        extra = sorted(set(factors) - required - optional)
        if extra:
            return (
                f"layer {layer.name!r} has factor {extra[0]!r}, which this {kind} does not keep "
                f"(alpha1={group['alpha1']})"
            )
    dims = (layer.dim_K, layer.dim_C)
    dtypes = optimizer._configured_dtypes(layer)
    widen = optimizer.precision == "auto"
    for key, value in factors.items():
        side = own[key]
        where = f"layer {layer.name!r} factor {key!r}"
        if kind == "SINGD":
            structure = optimizer.param_groups[layer.group_index]["structures"][side]
            problem = _structured_problem(where, value, structure, dims[side], dtypes[side], widen)
        else:
            dtype = None if key in INVERSES else dtypes[side]
            problem = _tensor_problem(where, value, (dims[side], dims[side]), dtype, widen)
        if problem is not None:
            return problem
    return None


def _structured_problem(
    where: str, value: Any, structure: str, dim: int, dtype: torch.dtype, widen: bool = False
) -> str | None:
    """A SINGD factor as `KroneckerOptimizer.state_dict` writes it: structure, dim, tensors."""
    if not isinstance(value, Mapping) or not {"structure", "dim", "tensors"} <= set(value):
        return f"{where} is not a saved structured matrix (structure, dim, tensors)"
    if value["structure"] != structure:
        return (
            f"{where} is {value['structure']!r} in the checkpoint but this optimizer is "
            f"configured {structure!r}"
        )
    if value["dim"] != dim:
        return (
            f"{where} has dimension {value['dim']!r} in the checkpoint but {dim} here "
            "(a checkpoint of another model)"
        )
    tensors = value["tensors"]
    shapes = get_structure(structure).tensor_shapes(dim)
    if not isinstance(tensors, Mapping) or set(tensors) != set(shapes):
        found = sorted(tensors) if isinstance(tensors, Mapping) else type(tensors).__name__
        return f"{where} stores {found} where a {structure} matrix stores {sorted(shapes)}"
    for name, shape in shapes.items():
        problem = _tensor_problem(f"{where} ({name})", tensors[name], tuple(shape), dtype, widen)
        if problem is not None:
            return problem
    return None


def _tensor_problem(
    where: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype | None, widen: bool = False
) -> str | None:
    """A tensor of ``shape`` and ``dtype`` (any floating dtype where ``dtype`` is None;
    ``dtype`` or a wider one of its `widenings` where ``widen``)."""
    if not isinstance(value, Tensor):
        return f"{where} is a {type(value).__name__}, not a tensor"
    if tuple(value.shape) != shape:
        return (
            f"{where} has shape {tuple(value.shape)} in the checkpoint but {shape} here "
            "(a checkpoint of another model)"
        )
    if dtype is None and not value.is_floating_point():
        return f"{where} is {value.dtype}, not floating point"
    allowed = widenings(dtype) if widen and dtype is not None else [dtype]
    if dtype is not None and value.dtype not in allowed:
        return f"{where} is {value.dtype} in the checkpoint but {dtype} here"
    return None


class _Saved(NamedTuple):
    """Where a tensor of the skeleton was: its key in the DCP table, shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _split(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` (keyed by its path) and replaced
    by its `_Saved` entry."""
    if isinstance(value, Tensor):
        key = "/".join(path)
        tensors[key] = value
        return _Saved(key, tuple(value.shape), value.dtype)
    if isinstance(value, Mapping):
        return {k: _split(v, (*path, str(k)), tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_split(v, (*path, str(i)), tensors) for i, v in enumerate(value))
    return value


def _join(value: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `_split`: the skeleton with its tensors put back."""
    if isinstance(value, _Saved):
        return tensors[value.key]
    if isinstance(value, Mapping):
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_join(v, tensors) for v in value)
    return value


def dcp_state_dict(optimizer: KroneckerOptimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict`` as ``torch.distributed.checkpoint.save`` takes it:
    ``{"skeleton": bytes, "tensors": {path: tensor}}`` (DTensors stay sharded)."""
    tensors: dict[str, Tensor] = {}
    skeleton = _split(optimizer.state_dict(), (), tensors)
    if optimizer._owners:  # sharded state: each rank's layers, one skeleton of them all
        import torch.distributed as dist

        skeletons: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(skeletons, skeleton)
        skeleton = _merge(skeletons)
    return {"skeleton": pickle.dumps(skeleton), "tensors": tensors}


def _merge(values: list[Any]) -> Any:
    """The union of the ranks' skeletons (tables merged key by key; else the first's)."""
    if all(isinstance(v, Mapping) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _merge([v[k] for v in values if k in v]) for k in keys}
    return values[0]


def _saved_tensors(value: Any) -> list[_Saved]:
    if isinstance(value, _Saved):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value
    if isinstance(value, Mapping | list | tuple):
        return [s for v in items for s in _saved_tensors(v)]
    return []


def _buffer(saved: _Saved, optimizer: KroneckerOptimizer) -> Tensor:
    """Where DCP reads one saved tensor into: for a parameter's state of the parameter's
    shape, a tensor placed as the parameter (a DTensor shard under FSDP2), else whole."""
    path = saved.key.split("/")
    params: list[Tensor] = []
    if path[0] == "state":
        params = [p for g in optimizer.param_groups for p in g["params"]]
    elif path[:3] == ["kronecker", "fallback", "state"] and optimizer.fallback is not None:
        params = [p for g in optimizer.fallback.param_groups for p in g["params"]]
        path = path[2:]
    index = int(path[1]) if len(path) > 2 and path[1].isdigit() else len(params)
    param = params[index] if index < len(params) else None
    if param is not None and saved.shape and saved.shape == tuple(param.shape):
        return torch.empty_like(param, dtype=saved.dtype)
    device = optimizer._layers[0].module.weight.device
    return torch.empty(saved.shape, dtype=saved.dtype, device=device)


def load_dcp(optimizer: KroneckerOptimizer, checkpoint_id: Any, key: str = "optimizer") -> None:
    """Load the optimizer state that `dcp_state_dict` saved under ``key`` of a DCP
    checkpoint (a directory, or what ``dcp.load``'s ``checkpoint_id`` takes).

    Every rank calls it; the world size may differ from the saving run's.

    Raises:
        ValueError: As ``load_state_dict``, where the checkpoint does not fit.
    """
    import torch.distributed.checkpoint as dcp

    head: dict[str, Any] = {key: {"skeleton": b""}}
    dcp.load(head, checkpoint_id=checkpoint_id)
    skeleton = pickle.loads(head[key]["skeleton"])  # noqa: S301 (what dcp_state_dict wrote)
    for layer in optimizer._layers:  # sharded state: the other ranks' layers stay there
        if not optimizer.owns(layer):
            skeleton["kronecker"]["layers"].pop(layer.name, None)
    tensors = {saved.key: _buffer(saved, optimizer) for saved in _saved_tensors(skeleton)}
    dcp.load({key: {"tensors": tensors}}, checkpoint_id=checkpoint_id)
    optimizer.load_state_dict(_join(skeleton, tensors))
