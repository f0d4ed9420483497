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
- AdamW stores two moments per parameter entry (the per-tensor step counters, a few
  bytes, are not counted).
- Parameters of layers the Kronecker optimizers do not precondition (norms, embeddings,
  attention projections) are trained by the AdamW fallback: two moments per entry.

Layer dimensions follow the paper: Linear ``d_K = d_in (+1 with bias)``, ``d_C = d_out``;
Conv2d ``d_K = C_in / groups * k_1 * k_2 (+1)``, ``d_C = C_out``. Every figure is in bytes
(B): entries times the element size of the state's dtype.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from precision_lab.errors import UsageError
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

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(text: str) -> torch.dtype:
    """``fp32|fp16|bf16`` or the torch names, to a torch dtype (one sentence if unknown)."""
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise UsageError(
            f"Unknown dtype {text!r}; expected one of fp32, fp16, bf16 (or float32, "
            "float16, bfloat16)."
        ) from None


@dataclass(frozen=True)
class LayerShape:
    """A layer that the Kronecker-factored optimizers precondition.

    Attributes:
        name: Qualified module name.
        kind: ``linear`` or ``conv2d``.
        dim_k: d_K, the input-side factor dimension (with the bias column).
        dim_c: d_C, the output-side factor dimension.
        params: Parameter entries of the layer (weight and bias).
    """

    name: str
    kind: str
    dim_k: int
    dim_c: int
    params: int


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of a model: its supported layers and the rest."""

    layers: tuple[LayerShape, ...]
    fallback_params: int

    @property
    def params(self) -> int:
        """All parameter entries of the model."""
        return sum(layer.params for layer in self.layers) + self.fallback_params


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
            layers.append(
                LayerShape(name, "linear", module.in_features + bias, module.out_features, params)
            )
        else:
            k1, k2 = module.kernel_size
            d_K = module.in_channels // module.groups * k1 * k2 + bias
            layers.append(LayerShape(name, "conv2d", d_K, module.out_channels, params))
    fallback = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    return ModelShape(tuple(layers), fallback)


def _family(spec: str) -> tuple[str, tuple[str, str] | None]:
    """(family, (s_K, s_C) for SINGD) of an optimizer spec string (DESIGN.md's names)."""
    text = spec.strip().lower()
    if text in ("adamw", "sgd"):
        return text, None
    if text == "ingd":
        return "singd", ("dense", "dense")
    if text == "ikfac":
        return "ikfac", ("dense", "dense")
    family, _, rest = text.partition(":")
    if family == "kfac":
        return "kfac", None
    if family == "singd" and rest:
        s_K, _, s_C = rest.partition("/")
        return "singd", (s_K, s_C or s_K)
    raise UsageError(
        f"Unknown optimizer spec {spec!r}; expected adamw, sgd, ingd, ikfac, kfac:METHOD, "
        "singd:STRUCTURE or singd:STRUCTURE_K/STRUCTURE_C."
    )


def state_entries(spec: str, shape: ModelShape) -> dict[str, int]:
    """Optimizer-state entries (counts, not bytes) by category for one spec.

    Raises:
        UsageError: For an unknown spec or structure name (one sentence).
    """
    family, structures = _family(spec)
    counts = dict.fromkeys(CATEGORIES, 0)
    kron_params = sum(layer.params for layer in shape.layers)
    if family == "adamw":
        counts["param_buffers"] = 2 * shape.params
        return counts
    if family == "sgd":
        counts["param_buffers"] = shape.params
        return counts
    counts["fallback"] = 2 * shape.fallback_params
    counts["param_buffers"] = kron_params
    if family == "kfac":
        dense = sum(layer.dim_k**2 + layer.dim_c**2 for layer in shape.layers)
        counts["factors"] = dense
        counts["inverses"] = dense
        return counts
    try:
        s_K, s_C = (get_structure(s) for s in structures)
    except ValueError as err:
        raise UsageError(str(err)) from err
    factors = sum(
        s_K.storage_entries(layer.dim_k) + s_C.storage_entries(layer.dim_c)
        for layer in shape.layers
    )
    counts["factors"] = factors
    counts["momenta"] = 0 if family == "ikfac" else factors
    return counts


def state_bytes(spec: str, shape: ModelShape, dtype: torch.dtype) -> dict[str, int]:
    """Optimizer-state bytes (B) by category, all state held in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    return {k: v * itemsize for k, v in state_entries(spec, shape).items()}


# --------------------------------------------------------------------------------------
# Models to plan for, built on the meta device
# --------------------------------------------------------------------------------------


def _builtin(model: str, d_model: int, layers: int | None, heads: int | None) -> nn.Module:
    from precision_lab import models

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
    with torch.device("meta"):
        if model in ("mlp", "cnn", "transformer"):
            built = _builtin(model, d_model, layers, heads)
        elif ":" in model:
            built = _factory(model)()
        else:
            raise UsageError(
                f"Unknown model {model!r}; expected mlp, cnn, transformer or module:factory."
            )
    if not isinstance(built, nn.Module):
        raise UsageError(f"--model {model!r} returned a {type(built).__name__}, not an nn.Module.")
    return built


@dataclass(frozen=True)
class MemoryPlan:
    """Optimizer-state bytes (B) of every spec for one model and dtype."""

    shape: ModelShape
    dtype: torch.dtype
    rows: dict[str, dict[str, int]]

    def total(self, spec: str) -> int:
        """All state bytes (B) of ``spec``."""
        return sum(self.rows[spec].values())


def plan_memory(
    model: nn.Module, dtype: torch.dtype, specs: Sequence[str] = DEFAULT_SPECS
) -> MemoryPlan:
    """Optimizer-state bytes of each spec for ``model`` with all state in ``dtype``.

    Raises:
        UsageError: If the model has no Linear or Conv2d layer to precondition.
    """
    shape = model_shape(model)
    if not shape.layers:
        raise UsageError(
            "The model has no Linear or Conv2d layer, so SINGD and KFAC have nothing to "
            "precondition."
        )
    return MemoryPlan(shape, dtype, {spec: state_bytes(spec, shape, dtype) for spec in specs})
