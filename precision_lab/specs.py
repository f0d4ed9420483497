"""Optimizer spec strings: one way to name an optimizer in the CLI, suites and baselines.

Forms (case-insensitive, whitespace ignored; DESIGN.md):

=================================  ==========================================================
``singd:K`` / ``singd:K/C``        SINGD with structure K for both factors, or K and C apart
                                   (any name `singd.structures.get_structure` accepts)
``ingd``                           INGD, i.e. ``singd:dense``
``ikfac`` / ``ikfac:K[/C]``        IKFAC: SINGD with ``kfac_like=True``; dense unless named
``kfac:METHOD``                    KFAC with ``inverse_method`` ``cholesky``, ``eigh``, ``inv``
                                   or ``newton-schulz``
``adamw``, ``sgd``                 torch.optim.AdamW / SGD over all trainable parameters
``SPEC+auto``                      any SINGD-family or KFAC spec above with
                                   ``precision="auto"`` (docs/precision.md), e.g.
                                   ``kfac:cholesky+auto``; the suffix stays in the name
=================================  ==========================================================

Hyperparameters come from `DEFAULT_HYPERPARAMETERS` (one small table per family: the
constructors' own defaults, which are the published SINGD's, except ``T = 1`` so that the
short stress runs update their preconditioners at every step) and a user's overrides
(``OptimizerSpec.build(model, overrides)``; suites pass theirs from TOML); the spec itself
fixes the structures, ``kfac_like``, ``inverse_method`` and ``precision`` (``"auto"`` with
the ``+auto`` suffix, else the constructors' ``None``), which overrides cannot change.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from precision_lab.dtypes import FLOATING, parse_dtype
from precision_lab.errors import UsageError

SPEC_FORMS = (
    "singd:K",
    "singd:K/C",
    "ingd",
    "ikfac",
    "ikfac:K/C",
    "kfac:cholesky",
    "kfac:eigh",
    "kfac:inv",
    "kfac:newton-schulz",
    "adamw",
    "sgd",
    "SPEC+auto",
)
"""The forms `parse_spec` accepts, for messages and CLI help."""

AUTO_SUFFIX = "+auto"
"""Spec suffix building a SINGD or KFAC optimizer with ``precision="auto"``."""

FAMILIES = ("singd", "kfac", "adamw", "sgd")

DEFAULT_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "singd": {"lr": 1e-3, "momentum": 0.9, "damping": 1e-3, "alpha1": 0.5, "T": 1, "lr_cov": 1e-2},
    "kfac": {"lr": 1e-3, "momentum": 0.9, "damping": 1e-3, "T": 1, "factor_decay": 0.95},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "sgd": {"lr": 1e-2, "momentum": 0.9},
}
"""Per-family defaults; `OptimizerSpec.build` overrides take precedence."""


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed optimizer spec.

    Attributes:
        text: The canonical spec string (lower case; structures as their canonical names,
            ``singd:diagonal`` for K and C alike), used as the optimizer's name in data.
        family: ``singd``, ``kfac``, ``adamw`` or ``sgd``.
        structures: ``(K, C)`` structure names for SINGD, ``("dense", "dense")`` for KFAC
            (its factors are dense), None for AdamW and SGD.
        fixed: Constructor arguments the spec determines (``structures``, ``kfac_like``,
            ``inverse_method``; ``precision="auto"`` for a ``+auto`` spec).
    """

    text: str
    family: str
    structures: tuple[str, str] | None
    fixed: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def auto(self) -> bool:
        """Whether the spec has the ``+auto`` suffix (``precision="auto"``)."""
        return self.fixed.get("precision") == "auto"

    @property
    def structure(self) -> str | None:
        """The structure as written in summaries: ``K`` when K and C agree, else ``K/C``."""
        if self.structures is None:
            return None
        first, second = self.structures
        return first if first == second else f"{first}/{second}"

    def hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The family's defaults updated with ``overrides``, checked against the optimizer.

        Raises:
            UsageError: An override names a parameter the optimizer does not take, or one
                the spec fixes.
        """
        overrides = dict(overrides or {})
        for key in overrides:
            if key == "precision" and self.family in ("singd", "kfac"):
                raise UsageError(
                    f"Hyperparameter 'precision' is set by the spec {self.text!r}; "
                    f"add or drop the {AUTO_SUFFIX!r} suffix instead of overriding it."
                )
            if key in self.fixed:
                raise UsageError(
                    f"Hyperparameter {key!r} is set by the spec {self.text!r}; "
                    "choose another spec instead of overriding it."
                )
        accepted = _keyword_names(_optimizer_class(self.family))
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise UsageError(
                f"Unknown hyperparameter {unknown[0]!r} for {self.text!r}; valid ones are "
                f"{', '.join(sorted(accepted - set(self.fixed)))}."
            )
        values = {**DEFAULT_HYPERPARAMETERS[self.family], **overrides}
        if self.fixed.get("kfac_like") and "alpha1" not in overrides:
            values["alpha1"] = 0.0  # IKFAC has no Riemannian momentum (it would warn and drop it)
        return {key: _dtype_value(key, value) for key, value in values.items()}

    def build(
        self, model: nn.Module, overrides: Mapping[str, Any] | None = None
    ) -> torch.optim.Optimizer:
        """The optimizer for ``model``'s trainable parameters, in the model's current dtype.

        SINGD and KFAC keep their factors in the weights' dtype unless an override
        (``preconditioner_dtype``, ``factor_dtype``) says otherwise.

        Args:
            model: The model (SINGD and KFAC hook its supported layers).
            overrides: Hyperparameters replacing `DEFAULT_HYPERPARAMETERS` entries; dtype
                values may be torch dtypes or names (``bf16``, ``float32``, ...).

        Raises:
            UsageError: A bad override name (the optimizers raise ValueError for bad
                values, naming the value).
        """
        hyperparameters = self.hyperparameters(overrides)
        cls = _optimizer_class(self.family)
        if self.family in ("adamw", "sgd"):
            params = [p for p in model.parameters() if p.requires_grad]
            return cls(params, **hyperparameters)
        return cls(model, **self.fixed, **hyperparameters)


def parse_spec(text: str) -> OptimizerSpec:
    """Parse one spec string (see the module docstring for the forms).

    Raises:
        UsageError: (a ValueError) for an unknown spec, method or structure, in one
            sentence listing the valid forms.
    """
    if not isinstance(text, str):
        raise UsageError(f"An optimizer spec must be a string such as 'kfac:eigh', got {text!r}.")
    key = "".join(text.split()).lower()
    if key.endswith(AUTO_SUFFIX):
        spec = _parse_plain(key.removesuffix(AUTO_SUFFIX), text)
        if spec.family not in ("singd", "kfac"):
            raise UsageError(
                f"Optimizer spec {text!r} cannot take {AUTO_SUFFIX!r}: only SINGD-family "
                f"(singd, ingd, ikfac) and KFAC specs have factors to widen, such as "
                f"'kfac:cholesky{AUTO_SUFFIX}'."
            )
        return OptimizerSpec(
            spec.text + AUTO_SUFFIX,
            spec.family,
            spec.structures,
            {**spec.fixed, "precision": "auto"},
        )
    return _parse_plain(key, text)


def _parse_plain(key: str, text: str) -> OptimizerSpec:
    """A normalized spec without the ``+auto`` suffix; ``text`` as written, for messages."""
    head, sep, tail = key.partition(":")
    if head in ("adamw", "sgd") and not sep:
        return OptimizerSpec(head, head, None)
    if head == "ingd" and not sep:
        return _singd("ingd", ("dense", "dense"), kfac_like=False)
    if head == "ikfac" and (not sep or tail):
        structures = _structures(tail, text) if sep else ("dense", "dense")
        name = "ikfac" if structures == ("dense", "dense") else _structured("ikfac", structures)
        return _singd(name, structures, kfac_like=True)
    if head == "singd" and tail:
        structures = _structures(tail, text)
        return _singd(_structured("singd", structures), structures, kfac_like=False)
    if head == "kfac" and sep:
        from singd.optim.inverses import INVERSE_METHODS

        if tail in INVERSE_METHODS:
            return OptimizerSpec(
                f"kfac:{tail}", "kfac", ("dense", "dense"), {"inverse_method": tail}
            )
    raise UsageError(_unknown(text))


def parse_specs(text: str) -> list[OptimizerSpec]:
    """Parse a comma-separated list of specs, in order, duplicates removed.

    Raises:
        UsageError: For an empty list or any unknown spec (the first one).
    """
    parts = [part for part in text.split(",") if part.strip()] if isinstance(text, str) else []
    if not parts:
        raise UsageError(f"Expected a comma-separated list of optimizer specs, got {text!r}.")
    specs: dict[str, OptimizerSpec] = {}
    for part in parts:
        spec = parse_spec(part)
        specs.setdefault(spec.text, spec)
    return list(specs.values())


def _unknown(text: str) -> str:
    return (
        f"Unknown optimizer spec {text!r}; valid forms are {', '.join(SPEC_FORMS)}, "
        "where K and C are structure names such as dense, diagonal or hierarchical15_15 "
        "and SPEC is a SINGD-family or KFAC spec."
    )


def _structures(tail: str, text: str) -> tuple[str, str]:
    """``"K"`` or ``"K/C"`` as canonical structure names, checked by get_structure."""
    from singd.structures import get_structure

    names = tail.split("/")
    if len(names) not in (1, 2) or not all(names):
        raise UsageError(_unknown(text))
    try:
        canonical = tuple(get_structure(name).name for name in names)
    except ValueError as err:
        raise UsageError(f"In optimizer spec {text!r}: {err}") from None
    return (canonical[0], canonical[-1])


def _structured(head: str, structures: tuple[str, str]) -> str:
    first, second = structures
    return f"{head}:{first}" if first == second else f"{head}:{first}/{second}"


def _singd(text: str, structures: tuple[str, str], *, kfac_like: bool) -> OptimizerSpec:
    return OptimizerSpec(
        text, "singd", structures, {"structures": structures, "kfac_like": kfac_like}
    )


def _optimizer_class(family: str) -> type[torch.optim.Optimizer]:
    if family == "singd":
        from singd.optim.singd import SINGD

        return SINGD
    if family == "kfac":
        from singd.optim.kfac import KFAC

        return KFAC
    return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[family]


def _keyword_names(cls: type) -> set[str]:
    """Constructor parameters a spec's hyperparameters may set (not model/params)."""
    parameters = inspect.signature(cls).parameters
    return {name for name in parameters if name not in ("self", "model", "params")}


def _dtype_value(key: str, value: Any) -> Any:
    """Turn dtype names in ``*_dtype`` hyperparameters (TOML has no dtypes) into dtypes."""
    if not key.endswith("_dtype"):
        return value
    if isinstance(value, list | tuple):
        return tuple(_dtype_value(key, item) for item in value)
    if not isinstance(value, str):
        return value
    try:
        return parse_dtype(value, accept=FLOATING)
    except ValueError:
        raise UsageError(
            f"Hyperparameter {key!r} must name a floating dtype such as 'float32' or 'bf16', "
            f"got {value!r}."
        ) from None
