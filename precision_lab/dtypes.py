"""Dtype names as users write them (``fp32|fp16|bf16`` or torch's) and as data stores them.

Everywhere in data (summary.json, records, baselines) a dtype is written by its torch
name: ``float32``, ``float16``, ``bfloat16``.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(text: str) -> torch.dtype:
    """The torch dtype a user means by ``text`` (case-insensitive, ``torch.`` prefix allowed).

    Raises:
        ValueError: For any other name, in one sentence listing the accepted ones.
    """
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {text!r}; expected one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The torch name of ``dtype``, as written in data: ``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
