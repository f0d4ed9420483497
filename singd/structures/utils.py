"""Small tensor helpers under the published singd 0.0.5 import path
``singd.structures.utils``, for code and tests written against that package.

Our structures do not need them (each computes its projections its own way); they are
kept here, each a few lines on plain torch, so that imports of the published helpers
keep working. The published helpers ``toeplitz_matmul`` and ``lowest_precision`` have no
counterpart here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_half_precision(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float (``float16`` or ``bfloat16``)."""
    return dtype in (torch.float16, torch.bfloat16)


def supported_eye(n: int, **kwargs: Any) -> Tensor:
    """The n x n identity, as ``torch.eye(n, **kwargs)`` (``dtype``, ``device``, ...).

    The published helper worked around a missing bfloat16 ``eye`` on some CPU builds;
    building it as zeros with a filled diagonal needs no such kernel.
    """
    eye = torch.zeros((n, n), **kwargs)
    eye.diagonal().fill_(1)
    return eye


def all_traces(mat: Tensor) -> Tensor:
    """The sums of all diagonals of an r x c matrix, from the bottom-left corner (offset
    ``-(r - 1)``) to the top-right one (offset ``c - 1``): length ``r + c - 1``."""
    rows, cols = mat.shape
    offsets = torch.arange(cols, device=mat.device) - torch.arange(rows, device=mat.device)[:, None]
    traces = mat.new_zeros(rows + cols - 1)
    return traces.index_add_(0, (offsets + rows - 1).flatten(), mat.flatten())


def diag_add_(mat: Tensor, value: float) -> Tensor:
    """Add ``value`` to the diagonal of a square ``mat`` in place; returns ``mat``."""
    mat.diagonal().add_(value)
    return mat
