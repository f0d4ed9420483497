"""Which parameters a Kronecker optimizer's factors cover, and the fallback for the rest.

Supported layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, transposed linear layers
such as GPT-2's ``Conv1D``: `singd.optim.layers.is_supported`) whose weight is among the optimized
parameters get one Kronecker-factored preconditioner each (`find_layers`); every other
parameter (normalisation layers, embeddings, attention projections) is handed to a
fallback optimizer (`build_fallback`, stepped by `step_fallback`), or left untrained
with a warning when there is none.

Layers whose forward never runs. Some supported layers hold weights that their owner
uses directly (``nn.MultiheadAttention.out_proj`` is never called). At the first step
that is not skipped, every layer whose forward hook has never fired is moved to the
fallback optimizer with a warning (with ``fallback=None`` it is left untrained, with a
warning). A layer first used after that step stays Kronecker-factored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import Tensor, nn
from torch.optim import AdamW, Optimizer

from singd.optim.distributed import all_reduce_split
from singd.optim.layers import KroneckerLayer, check_conv_padding, is_supported, layer_dims
from singd.optim.scaling import Scale, not_one

FallbackFactory = Callable[[list[dict[str, Any]]], Optimizer]
DEFAULT_FALLBACK = "adamw"
NO_LAYER = (
    "model has no nn.Linear, nn.Conv1d, nn.Conv2d or transposed linear (GPT-2 Conv1D) "
    "layer whose weight is among the optimized "
    "parameters; use a model with such a layer or another optimizer."
)


def adamw(groups: list[dict[str, Any]]) -> Optimizer:
    """The default fallback: ``torch.optim.AdamW`` with its own defaults."""
    return AdamW(groups)


def default_params(module: nn.Module, has_fallback: bool, warn: bool) -> list[Tensor]:
    """All trainable parameters; without a fallback, those of supported layers only
    (warning, where ``warn``, about each other layer's)."""
    if has_fallback:
        return [p for p in module.parameters() if p.requires_grad]
    params, seen = [], set()
    for name, mod in module.named_modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if is_supported(mod):
            params += [p for p in own if id(p) not in seen]
            seen.update(id(p) for p in own)
        elif own and warn:
            warnings.warn(
                f"Parameters of layer {name!r} ({type(mod).__name__}) will not be "
                "trained: fallback=None and the layer is not a supported layer "
                "(nn.Linear, nn.Conv1d, nn.Conv2d, transposed linear).",
                stacklevel=4,
            )
    return params


def find_layers(module: nn.Module, param_groups: list[dict[str, Any]]) -> list[KroneckerLayer]:
    """The supported layers whose weight is optimized, in model order; a weight shared
    by several layers belongs to the first.

    Raises:
        ValueError: A layer's weight and bias in different parameter groups.
    """
    group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    layers, claimed = [], set()
    for name, mod in module.named_modules():
        if not is_supported(mod) or id(mod.weight) not in group_of:
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


def warn_untrained(groups: list[list[Tensor]], why: str) -> None:
    """Warn that the parameters in ``groups`` (if any) will not be trained, and ``why``."""
    count = sum(len(ps) for ps in groups)
    if count:
        warnings.warn(
            f"{count} optimized parameter tensor(s) will not be trained ({why}) "
            "because fallback=None; pass fallback='adamw' to train them.",
            stacklevel=4,
        )


def build_fallback(
    factory: FallbackFactory | None,
    param_groups: list[dict[str, Any]],
    fallback_params: list[list[Tensor]],
) -> Optimizer | None:
    """The fallback optimizer over ``fallback_params`` (per parameter group), with each
    group's ``lr`` and ``weight_decay``; None without a factory or parameters."""
    if factory is None:
        return None
    groups = [
        {
            "params": ps,
            "lr": param_groups[i]["lr"],
            "weight_decay": param_groups[i]["weight_decay"],
            "group_index": i,
        }
        for i, ps in enumerate(fallback_params)
        if ps
    ]
    return factory(groups) if groups else None


def silent_layers_message(names: list[str], has_fallback: bool) -> str:
    """The warning for layers whose forward never ran."""
    what = "moved to the fallback optimizer" if has_fallback else "left untrained (fallback=None)"
    return (
        f"The forward of layer(s) {', '.join(names)} never ran (their owner uses the "
        f"weights directly); their parameters are {what}."
    )


def step_fallback(
    fallback: Optimizer,
    param_groups: list[dict[str, Any]],
    divisor: Scale,
    world: int,
    ddp: bool,
) -> None:
    """Step the fallback optimizer with its groups' ``lr`` and ``weight_decay`` in sync.

    Gradients are divided by the GradScaler's ``divisor`` first; inside DDP a summed
    loss's gradients are multiplied by ``world`` (DDP averaged them); without DDP they
    are all-reduced, averaged or summed as the group's ``loss_average`` says.
    """
    grads, averaged = [], []
    for fgroup in fallback.param_groups:
        group = param_groups[fgroup["group_index"]]
        fgroup["lr"], fgroup["weight_decay"] = group["lr"], group["weight_decay"]
        for p in fgroup["params"]:
            if p.grad is None:
                continue
            if not_one(divisor):
                p.grad.div_(divisor)
            if ddp and group["loss_average"] is None:
                p.grad.mul_(world)
            grads.append(p.grad)
            averaged.append(group["loss_average"] is not None)
    if world > 1 and not ddp:
        all_reduce_split(grads, averaged)
    fallback.step()


@dataclass
class TypeCoverage:
    """Where the parameters of one layer type go: tensor and element counts.

    Attributes:
        preconditioned_tensors, preconditioned_elements: Covered by Kronecker factors.
        fallback_tensors, fallback_elements: Stepped by the fallback optimizer.
        untrained_tensors, untrained_elements: Stepped by neither: frozen, left out of
            the optimized parameters, or optimized with ``fallback=None``.
    """

    preconditioned_tensors: int = 0
    preconditioned_elements: int = 0
    fallback_tensors: int = 0
    fallback_elements: int = 0
    untrained_tensors: int = 0
    untrained_elements: int = 0

    @property
    def tensors(self) -> int:
        """All parameter tensors of the type."""
        return self.preconditioned_tensors + self.fallback_tensors + self.untrained_tensors

    @property
    def elements(self) -> int:
        """All parameter elements of the type."""
        return self.preconditioned_elements + self.fallback_elements + self.untrained_elements

    @property
    def fraction(self) -> float:
        """Preconditioned share of the elements (0.0 without any)."""
        return self.preconditioned_elements / self.elements if self.elements else 0.0

    def add(self, where: str, elements: int) -> None:
        """Count one tensor of ``elements`` entries as ``where`` (a `PLACES` entry)."""
        setattr(self, f"{where}_tensors", getattr(self, f"{where}_tensors") + 1)
        setattr(self, f"{where}_elements", getattr(self, f"{where}_elements") + elements)


PLACES: tuple[str, ...] = ("preconditioned", "fallback", "untrained")


@dataclass(frozen=True)
class Coverage:
    """Which of a model's parameters a Kronecker optimizer preconditions, by layer type.

    Each parameter tensor (a tied one once) is counted under the class name of the layer
    that holds it: the Kronecker-factored layer that covers it, otherwise the first
    module owning it in the model's order.

    Attributes:
        by_type: Layer class name (``"Linear"``, ``"Conv1D"``, ``"LayerNorm"``, ...) ->
            its counts, in model order.
        layers: Names of the Kronecker-factored layers.
        fallback_layers: Names of supported layers moved to the fallback (or left
            untrained) because their forward never ran.
        final: Whether that check has run (at the first step taken); before it, a layer
            whose forward never runs still counts as preconditioned.
    """

    by_type: dict[str, TypeCoverage]
    layers: tuple[str, ...]
    fallback_layers: tuple[str, ...]
    final: bool

    @property
    def total(self) -> TypeCoverage:
        """The counts over all layer types."""
        total = TypeCoverage()
        for counts in self.by_type.values():
            for f in fields(TypeCoverage):
                setattr(total, f.name, getattr(total, f.name) + getattr(counts, f.name))
        return total

    @property
    def fraction(self) -> float:
        """Preconditioned share of all parameter elements."""
        return self.total.fraction

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form: counts, elements and fraction per type and in total."""

        def plain(counts: TypeCoverage) -> dict[str, Any]:
            return {
                **asdict(counts),
                "tensors": counts.tensors,
                "elements": counts.elements,
                "fraction": counts.fraction,
            }

        return {
            "by_type": {name: plain(c) for name, c in self.by_type.items()},
            "total": plain(self.total),
            "layers": list(self.layers),
            "fallback_layers": list(self.fallback_layers),
            "final": self.final,
        }

    def __str__(self) -> str:
        """A small table: per layer type, elements preconditioned / fallback / untrained."""
        head = f"{'layer type':<16}{'preconditioned':>16}{'fallback':>12}{'untrained':>12}"
        lines = [head]
        for name, c in [*self.by_type.items(), ("total", self.total)]:
            lines.append(
                f"{name:<16}{c.preconditioned_elements:>16,}{c.fallback_elements:>12,}"
                f"{c.untrained_elements:>12,}  ({c.fraction:.1%} preconditioned)"
            )
        return "\n".join(lines)


def coverage_report(
    module: nn.Module,
    layers: list[KroneckerLayer],
    fallback: Optimizer | None,
    fallback_layers: list[str],
    final: bool,
) -> Coverage:
    """The `Coverage` of ``module``'s parameters.

    Args:
        module: The (unwrapped) model.
        layers: The Kronecker-factored layers.
        fallback: The fallback optimizer, if any.
        fallback_layers: Supported layers moved to the fallback.
        final: Whether layers whose forward never ran have been moved yet.
    """
    owner: dict[int, str] = {}
    for layer in layers:
        for p in layer.params:
            owner[id(p)] = type(layer.module).__name__
    covered = set(owner)
    stepped = (
        set() if fallback is None else {id(p) for g in fallback.param_groups for p in g["params"]}
    )
    by_type: dict[str, TypeCoverage] = {}
    seen: set[int] = set()
    for mod in module.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            where = (
                "preconditioned"
                if id(p) in covered
                else "fallback"
                if id(p) in stepped
                else "untrained"
            )
            name = owner.get(id(p), type(mod).__name__)
            by_type.setdefault(name, TypeCoverage()).add(where, p.numel())
    return Coverage(
        by_type=by_type,
        layers=tuple(layer.name for layer in layers),
        fallback_layers=tuple(fallback_layers),
        final=final,
    )
