"""Which parameters a Kronecker optimizer's factors cover, and the fallback for the rest.

Supported layers (``nn.Linear``, ``nn.Conv2d``) whose weight is among the optimized
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
from typing import Any

from torch import Tensor, nn
from torch.optim import AdamW, Optimizer

from singd.optim.distributed import all_reduce_split
from singd.optim.layers import SUPPORTED_LAYERS, KroneckerLayer, check_conv_padding, layer_dims
from singd.optim.scaling import Scale, not_one

FallbackFactory = Callable[[list[dict[str, Any]]], Optimizer]
DEFAULT_FALLBACK = "adamw"
NO_LAYER = (
    "model has no nn.Linear or nn.Conv2d layer whose weight is among the optimized "
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
        if isinstance(mod, SUPPORTED_LAYERS):
            params += [p for p in own if id(p) not in seen]
            seen.update(id(p) for p in own)
        elif own and warn:
            warnings.warn(
                f"Parameters of layer {name!r} ({type(mod).__name__}) will not be "
                "trained: fallback=None and the layer is not nn.Linear or nn.Conv2d.",
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
