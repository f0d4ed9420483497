"""A floating dtype's limits as the probes judge values against them.

For a binary floating format with largest finite value ``max``, machine epsilon ``eps``
and smallest normal ``tiny`` (``torch.finfo``):

- *overflow risk*: ``|x| > max / 2``; one doubling (a sum of two such values, a
  gradient-scaler growth step) reaches infinity.
- *subnormal*: ``0 < |x| < tiny``; precision is lost gradually below ``tiny``.
- *cast overflow*: a wider value rounds to infinity when cast to this dtype iff
  ``|x| >= max + ulp(max) / 2`` with ``ulp(max) = 2**floor(log2(max)) * eps``
  (round to nearest, ties to even; for float16 that is 65520, for bfloat16
  ``2**128 - 2**119``). The probes count such values by casting, which is exact; the
  threshold is kept for the per-step fused check, where only the magnitude is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Accept ``fp32|fp16|bf16``, torch names (``bfloat16``) or a floating ``torch.dtype``.

    Raises:
        ValueError: If the value names no floating dtype.
    """
    if isinstance(value, torch.dtype):
        if value.is_floating_point:
            return value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    raise ValueError(
        f"dtype {value!r} is not a floating dtype; use fp32, fp16, bf16 or a torch name "
        "such as float32, float16, bfloat16."
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The torch name written in the records (``bfloat16``, not ``torch.bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Limits:
    """The thresholds of one dtype, as Python floats.

    Attributes:
        max: Largest finite value.
        tiny: Smallest positive normal value.
        overflow_risk: ``max / 2``.
        cast_overflow: Smallest magnitude that rounds to infinity when cast to the dtype
            (``inf`` for float64, whose rounding boundary is no Python float).
    """

    max: float
    tiny: float
    overflow_risk: float
    cast_overflow: float


@cache
def limits(dtype: torch.dtype) -> Limits:
    """The `Limits` of a floating dtype (cached: called on the hot path)."""
    info = torch.finfo(dtype)
    top = math.ldexp(0.5, math.frexp(info.max)[1])  # largest power of 2 <= max (float64 too)
    return Limits(
        max=info.max,
        tiny=info.tiny,
        overflow_risk=info.max / 2,
        cast_overflow=info.max + top * info.eps / 2,
    )
