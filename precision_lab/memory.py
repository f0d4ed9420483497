"""Optimizer-state memory from layer shapes and storage formulas, without allocating weights.

A model is built on PyTorch's ``meta`` device (shapes, no storage), its layers are read
into `LayerShape`s, and each optimizer's state is counted from formulas:

- SINGD with structures ``(s_K, s_C)`` stores, per supported layer, ``K`` and ``C`` and,
  with Riemannian momentum (``alpha1 != 0``, the default), ``m_K`` and ``m_C``:
  ``2 (e_K(d_K) + e_C(d_C))`` entries, where ``e_s(d)`` is
  ``get_structure(s).storage_entries(d)``; plus one heavy-ball buffer per parameter
  entry (``momentum != 0``). IKFAC (``alpha1 = 0``) has no ``m_K``, ``m_C``.
- KFAC stores the dense factors ``A`` (``d_K^2``) and ``G`` (``d_C^2``) and their
  inverses (as many entries again), plus one heavy-ball buffer per parameter entry.
- AdamW stores two moments per parameter entry and a float32 step counter (4 B) per
  parameter tensor.
- Parameters of layers the Kronecker optimizers do not precondition (norms, embeddings,
  attention projections) are trained by the AdamW fallback: the same as AdamW.

Past one machine (``world_size`` ranks, docs/distributed.md), the figures are per rank:

- ``ddp``: every rank holds the whole state (DDP replicates it), whatever the world size;
- ``fsdp`` (FSDP2, ``fully_shard``): the parameters' own state (heavy-ball buffers, the
  fallback's and AdamW's moments) is sharded with the parameters, ``ceil(entries /
  world_size)`` per rank (FSDP pads each tensor's shards to equal rows: at most one row
  more per tensor, not counted); AdamW's step counters are held whole on every rank;
  each layer's Kronecker factors are held by one rank, the layers balanced by bytes
  (`singd.optim.fsdp.balance`): the figure is the most loaded rank's, at most the
  whole / ``world_size`` plus the largest layer's.

Layer dimensions follow the paper: Linear ``d_K = d_in (+1 with bias)``, ``d_C = d_out``;
Conv2d ``d_K = C_in / groups * k_1 * k_2 (+1)``, ``d_C = C_out``. Every figure is in bytes
(B): entries times the element size of the state's dtype.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from precision_lab.errors import UsageError
from precision_lab.specs import DEFAULT_HYPERPARAMETERS, OptimizerSpec, parse_spec
from singd.optim.fsdp import balance
from singd.structures import get_structure

CATEGORIES = ("factors", "momenta", "inverses", "param_buffers", "fallback")
"""Byte categories, as ``optimizer.state_bytes()`` reports them (docs/CONTRACTS.md)."""

DEFAULT_SPECS = (
    "adamw",
    "kfac:cholesky",
    "ingd",
    "ikfac",
    "singd:block30diagonal",
    "singd:hierarchical15_15",
    "singd:triltoeplitz",
    "singd:diagonal",
)


@dataclass(frozen=True)
class LayerShape:
    """A layer that the Kronecker-factored optimizers precondition.

    Attributes:
        name: Qualified module name.
        kind: ``linear`` or ``conv2d``.
        dim_k: d_K, the input-side factor dimension (with the bias column).
        dim_c: d_C, the output-side factor dimension.
        params: Parameter entries of the layer (weight and bias).
        tensors: Parameter tensors of the layer (1, or 2 with a bias).
    """

    name: str
    kind: str
    dim_k: int
    dim_c: int
    params: int
    tensors: int


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of a model: its supported layers and the rest."""

    layers: tuple[LayerShape, ...]
    fallback_params: int
    fallback_tensors: int

    @property
    def params(self) -> int:
        """All parameter entries of the model."""
        return sum(layer.params for layer in self.layers) + self.fallback_params

    @property
    def tensors(self) -> int:
        """All parameter tensors of the model (weights and biases counted apart)."""
        return sum(layer.tensors for layer in self.layers) + self.fallback_tensors


def _inside_attention(name: str, attention: set[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in attention)


def model_shape(model: nn.Module) -> ModelShape:
    """Read a model's supported layers (Linear, Conv2d) and count the other parameters.

    Attention modules keep their projections as raw parameters (``in_proj_weight``) and
    never call ``out_proj`` as a module, so all their parameters go to the fallback.
    """
    attention = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    layers, covered = [], set()
    for name, module in model.named_modules():
        if _inside_attention(name, attention) or not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        own = list(module.parameters(recurse=False))
        covered.update(id(p) for p in own)
        params = sum(p.numel() for p in own)
        bias = 1 if module.bias is not None else 0
        if isinstance(module, nn.Linear):
            d_K, d_C = module.in_features + bias, module.out_features
        else:
            k1, k2 = module.kernel_size
            d_K, d_C = module.in_channels // module.groups * k1 * k2 + bias, module.out_channels
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        layers.append(LayerShape(name, kind, d_K, d_C, params, len(own)))
    rest = [p for p in model.parameters() if id(p) not in covered]
    return ModelShape(tuple(layers), sum(p.numel() for p in rest), len(rest))


STEP_COUNTER_BYTES = 4
"""AdamW's per-tensor ``step``, a float32 scalar whatever the parameters' dtype."""


SHARDINGS = ("ddp", "fsdp")
"""How the state is laid out over ranks (module docstring)."""


def _per_rank(entries: int, world_size: int, sharding: str) -> int:
    """A parameter-shaped state's entries on one rank: sharded under FSDP."""
    return -(-entries // world_size) if sharding == "fsdp" else entries


def _adamw_bytes(params: int, tensors: int, itemsize: int) -> int:
    return 2 * params * itemsize + tensors * STEP_COUNTER_BYTES


def state_bytes(
    spec: str | OptimizerSpec,
    shape: ModelShape,
    dtype: torch.dtype,
    world_size: int = 1,
    sharding: str = "ddp",
) -> dict[str, int]:
    """Optimizer-state bytes (B) by category for one spec, all state held in ``dtype``,
    with the spec family's default hyperparameters (``m_K``, ``m_C`` only where
    ``alpha1 != 0`` and not IKFAC; heavy-ball buffers only where ``momentum != 0``), on
    one rank of ``world_size`` laid out as ``sharding`` says (module docstring).

    Raises:
        UsageError: For an unknown spec or structure name, a world size below 1 or an
            unknown sharding (one sentence).
    """
    if world_size < 1 or sharding not in SHARDINGS:
        raise UsageError(
            f"The world size must be at least 1 and the sharding one of "
            f"{', '.join(SHARDINGS)}, got {world_size} and {sharding!r}."
        )
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    hyper = DEFAULT_HYPERPARAMETERS[spec.family]
    out = dict.fromkeys(CATEGORIES, 0)

    def sharded(entries: int) -> int:
        return _per_rank(entries, world_size, sharding)

    if spec.family == "adamw":
        out["param_buffers"] = _adamw_bytes(sharded(shape.params), shape.tensors, itemsize)
        return out
    if spec.family == "sgd":
        out["param_buffers"] = sharded(shape.params) * itemsize if hyper.get("momentum") else 0
        return out
    out["fallback"] = _adamw_bytes(sharded(shape.fallback_params), shape.fallback_tensors, itemsize)
    if hyper.get("momentum"):
        out["param_buffers"] = sharded(sum(layer.params for layer in shape.layers)) * itemsize
    if spec.family == "kfac":
        dense = [(layer.dim_k**2 + layer.dim_c**2) * itemsize for layer in shape.layers]
        layers = [{"factors": d, "inverses": d} for d in dense]
    else:
        s_K, s_C = (get_structure(name) for name in spec.structures)
        riemannian_momentum = hyper.get("alpha1") and not spec.fixed.get("kfac_like")
        layers = []
        for layer in shape.layers:
            entries = s_K.storage_entries(layer.dim_k) + s_C.storage_entries(layer.dim_c)
            layers.append(
                {"factors": entries * itemsize, "momenta": entries * itemsize * riemannian_momentum}
            )
    if sharding == "fsdp" and world_size > 1:  # the most loaded rank's layers
        owners = balance([sum(cats.values()) for cats in layers], world_size)
        loads = [0] * world_size
        for cats, owner in zip(layers, owners, strict=True):
            loads[owner] += sum(cats.values())
        busiest = loads.index(max(loads))
        layers = [cats for cats, owner in zip(layers, owners, strict=True) if owner == busiest]
    for cats in layers:
        for category, nbytes in cats.items():
            out[category] += int(nbytes)
    return out


# --------------------------------------------------------------------------------------
# Models to plan for, built on the meta device
# --------------------------------------------------------------------------------------


def _builtin(model: str, d_model: int, layers: int | None, heads: int | None) -> nn.Module:
    from precision_lab.workloads import models

    if model == "mlp":
        return models.MLP(hidden=(d_model,) * (layers or 2))
    if model == "cnn":
        if layers is not None:
            raise UsageError("The cnn's depth is fixed (three convolutions): drop --layers.")
        return models.VGG(channels=(d_model, 2 * d_model))
    heads = heads or max(1, d_model // 64)
    if d_model % heads:
        raise UsageError(f"--heads {heads} does not divide --d-model {d_model}.")
    return models.Transformer(width=d_model, heads=heads, depth=layers or 1)


def _factory(target: str) -> Callable[[], nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(
            f"Cannot import module {module_name!r} of --model {target!r} ({err})."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(
            f"Module {module_name!r} has no callable {attr!r}: --model module:factory must "
            "name a function that returns an nn.Module."
        )
    return factory


class _NoInit(TorchFunctionMode):
    """Skips the in-place initialisers (``normal_``, ``uniform_``, ...) while a model is
    built on the meta device: meta tensors hold no values, and meta ``normal_`` would
    import torch._dynamo (seconds) only to do nothing."""

    OPS = frozenset(
        {"normal_", "uniform_", "fill_", "zero_", "trunc_normal_", "copy_", "exponential_"}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.nn.init passes its tensor by keyword, Tensor methods as self.
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in self.OPS and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def meta_device():
    """Build modules on the meta device without running their initialisers."""
    return _MetaBuild()


class _MetaBuild:
    def __enter__(self) -> None:
        self._modes = (torch.device("meta"), _NoInit())
        for mode in self._modes:
            mode.__enter__()

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


MAX_D_MODEL = 2**20
"""Largest width the planner builds (1,048,576; today's largest models are near 2**14)."""
MAX_LAYERS = 1024
"""Most layers or blocks the planner builds: 1,024 transformer blocks take about 5 s on
the meta device on a 2-core CPU (with ``-o``, the plot's sweep builds seven more)."""


def build_meta_model(
    model: str, d_model: int = 512, layers: int | None = None, heads: int | None = None
) -> nn.Module:
    """Build a model on the ``meta`` device: shapes only, no weights allocated.

    Args:
        model: ``mlp``, ``cnn``, ``transformer`` (the suites' models, widened), or
            ``module:factory``, a function called without arguments.
        d_model: Width: the MLP's hidden width, the CNN's first channel count, the
            transformer's model dimension.
        layers: Hidden layers of the MLP or blocks of the transformer.
        heads: Attention heads of the transformer (default ``d_model // 64``).

    Raises:
        UsageError: For an unknown model, a bad size or a factory that fails.
    """
    if d_model < 1 or (layers is not None and layers < 1):
        raise UsageError(f"Sizes must be positive, got --d-model {d_model} --layers {layers}.")
    for option, value, bound in (
        ("--d-model", d_model, MAX_D_MODEL),
        ("--layers", layers, MAX_LAYERS),
    ):
        if value is not None and value > bound:
            raise UsageError(
                f"{option} {value} is beyond the planner's bound of {bound}, past which it "
                "would build the model for minutes or overflow its sizes."
            )
    with meta_device():
        if model in ("mlp", "cnn", "transformer"):
            built = _builtin(model, d_model, layers, heads)
        elif ":" in model:
            factory = _factory(model)
            try:
                built = factory()
            except Exception as err:  # a user's code: any failure is a bad --model
                raise UsageError(
                    f"--model {model!r} failed to build ({type(err).__name__}: {err})."
                ) from None
        else:
            raise UsageError(
                f"Unknown model {model!r}; expected mlp, cnn, transformer or module:factory."
            )
    if not isinstance(built, nn.Module):
        raise UsageError(f"--model {model!r} returned a {type(built).__name__}, not an nn.Module.")
    return built


def widened_model(name: str, multiplier: int) -> nn.Module:
    """A suite model (`precision_lab.workloads.models.MODELS`) on the meta device with its width
    argument (the constructor's first: ``hidden``, ``channels``, ``width``) times
    ``multiplier``; ``multiplier=1`` is the model the suite trains.

    Raises:
        UsageError: For a name that is not a suite model.
    """
    from precision_lab.workloads import models

    if name not in models.MODELS:
        raise UsageError(f"Unknown model {name!r}; expected one of {', '.join(models.MODELS)}.")
    cls = models.MODELS[name]
    first = next(iter(inspect.signature(cls).parameters.values()))
    default = first.default
    wide = (
        tuple(w * multiplier for w in default)
        if isinstance(default, tuple)
        else default * multiplier
    )
    with meta_device():
        return cls(**{first.name: wide})


@dataclass(frozen=True)
class MemoryPlan:
    """Optimizer-state bytes (B) of every spec for one model and dtype, on one rank of
    ``world_size`` laid out as ``sharding`` says."""

    shape: ModelShape
    dtype: torch.dtype
    rows: dict[str, dict[str, int]]
    world_size: int = 1
    sharding: str = "ddp"

    def total(self, spec: str) -> int:
        """All state bytes (B) of ``spec``."""
        return sum(self.rows[spec].values())


def plan_memory(
    model: nn.Module,
    dtype: torch.dtype,
    specs: Sequence[str | OptimizerSpec] = DEFAULT_SPECS,
    world_size: int = 1,
    sharding: str = "ddp",
) -> MemoryPlan:
    """Optimizer-state bytes of each spec for ``model`` with all state in ``dtype``, per
    rank of ``world_size`` laid out as ``sharding`` says.

    Raises:
        UsageError: If the model has no Linear or Conv2d layer to precondition.
    """
    shape = model_shape(model)
    if not shape.layers:
        raise UsageError(
            "The model has no Linear or Conv2d layer, so SINGD and KFAC have nothing to "
            "precondition."
        )
    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    rows = {p.text: state_bytes(p, shape, dtype, world_size, sharding) for p in parsed}
    return MemoryPlan(shape, dtype, rows, world_size, sharding)
