"""Dtype names as users write them (``fp32|fp16|bf16`` or torch's) and as data stores them:
the one parser of dtype names in precision_lab (the CLI, suites, the memory planner and
the ``*_dtype`` hyperparameters of optimizer specs).

Everywhere in data (summary.json, records, baselines) a dtype is written by its torch
name: ``float32``, ``float16``, ``bfloat16``.
"""

from __future__ import annotations

import torch

NAMES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "float64": torch.float64,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
"""Every dtype name accepted, short and torch's; each dtype's short name comes first."""

FLOATING = tuple(dict.fromkeys(NAMES.values()))
"""Every dtype `NAMES` names."""

RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes a run is stressed in (``--dtype``, a suite's ``dtypes``)."""


def parse_dtype(text: str, accept: tuple[torch.dtype, ...] = RUN_DTYPES) -> torch.dtype:
    """The torch dtype a user means by ``text`` (case-insensitive, ``torch.`` prefix allowed).

    Args:
        text: A name of `NAMES`.
        accept: The dtypes allowed here: a run's by default; an optimizer's hyperparameter
            may also be float64.

    Raises:
        ValueError: For any other name, in one sentence listing the accepted ones.
    """
    key = text.strip().lower().removeprefix("torch.")
    if NAMES.get(key) not in accept:
        names = [name for name, dtype in NAMES.items() if dtype in accept]
        raise ValueError(f"Unknown dtype {text!r}; expected one of {', '.join(names)}.")
    return NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The torch name of ``dtype``, as written in data: ``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype) -> str:
    """The name a user types for ``dtype``: ``torch.bfloat16`` -> ``bf16`` (its first name in
    `NAMES`); torch's name for a dtype `NAMES` lacks."""
    return next((name for name, d in NAMES.items() if d == dtype), dtype_name(dtype))
