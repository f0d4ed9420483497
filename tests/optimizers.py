"""Every optimizer the tests train, declared once (as torch's ``common_optimizers.py``).

A test names optimizers by their spec strings (DESIGN.md "Optimizers, named as users name
them": ``singd:diagonal``, ``singd:hierarchical15_15/dense``, ``ikfac``, ``kfac:eigh``,
``sgd``, ``adamw``) and passes its own hyperparameters; `factory` returns a picklable
``model -> optimizer`` (the gloo ranks receive it), which takes further keywords at the
call (``loss_average``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from singd import KFAC, SINGD

KRONECKER = ("singd:dense", "singd:diagonal", "singd:hierarchical15_15/dense", "ikfac", "kfac")
"""One of each Kronecker family and structure kind: a property of `KroneckerOptimizer`
is tested over all of them."""
TORCH = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def _torch(cls: type[torch.optim.Optimizer], model: nn.Module, **hp: Any) -> torch.optim.Optimizer:
    return cls(model.parameters(), **hp)


def factory(spec: str, **hp: Any) -> Callable[..., torch.optim.Optimizer]:
    """``model -> optimizer`` for ``spec`` with hyperparameters ``hp``."""
    family, _, arg = spec.partition(":")
    if family == "singd":
        K, _, C = arg.partition("/")
        return partial(SINGD, structures=(K, C or K), **hp)
    if family == "ikfac":
        return partial(SINGD, kfac_like=True, alpha1=0.0, **hp)
    if family == "kfac":
        return partial(KFAC, **({"inverse_method": arg} if arg else {}), **hp)
    if family in TORCH and not arg:
        return partial(_torch, TORCH[family], **hp)
    raise ValueError(f"unknown optimizer spec {spec!r}")
