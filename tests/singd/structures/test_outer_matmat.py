"""``S.outer_matmat_(X) = S S^T X`` for every structure, against dense float64 algebra.

The operation may work in X's memory, so X is given both as a contiguous d x n tensor
and as the transpose of an n x d one (the layout SINGD hands over for ``K K^T G^T``).
Tolerances as in ``test_properties``: entrywise ``TOL[dtype]`` times the same product on
absolute values, normwise for the FFT-based Toeplitz structures.
"""

from __future__ import annotations

import pytest
import torch

from tests.singd.structures.cases import CASE_IDS, CASES, DTYPES, random_structured
from tests.singd.structures.test_properties import F64, ROWS, assert_within, lowp

LAYOUTS = ["contiguous", "transposed"]


def operand(dim: int, n: int, dtype: torch.dtype, layout: str, seed: int):
    """A (dim, n) operand stored in ``dtype`` and its float64 values: with contiguous
    rows, or the transpose of a contiguous (n, dim) matrix (SINGD's ``G^T``)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return lowp(torch.randn(dim, n, dtype=F64, generator=generator), dtype)
    X, X64 = lowp(torch.randn(n, dim, dtype=F64, generator=generator), dtype)
    return X.T, X64.T


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "dim"), CASES, ids=CASE_IDS)
def test_outer_matmat(name, dim, dtype, layout):
    S, S64 = random_structured(name, dim, dtype, seed=20)
    X, X64 = operand(dim, ROWS, dtype, layout, seed=21)
    # The reference first: X64 may share X's memory (float64), which X's owner gives up.
    expected = S64 @ S64.T @ X64
    bound = S64.abs() @ S64.abs().T @ X64.abs()
    out = S.outer_matmat_(X)
    assert out.dtype == dtype and out.shape == (dim, ROWS)
    assert_within(out, expected, bound, dtype, name)
