"""The dense structure's fast paths at the sizes where they switch on, against float64.

The property suite (`test_properties`) runs dense matrices up to d = 31, where
`symmetric_gram` does one product and `outer_matmat_` takes either branch only for a
few shapes. Here the Gram is split into blocks (d >= 256), the natural gradient's
``S S^T X`` forms the symmetric ``S S^T`` first (n > 3d / 4) or not, and X comes in both
layouts, each checked entrywise against the same product in float64 within
``TOL[dtype]`` times the product on absolute values, as in the property suite.
"""

from __future__ import annotations

import pytest
import torch

from singd.structures.dense import DenseMatrix, _split_gram, symmetric_gram
from tests.singd.structures.cases import DTYPES
from tests.singd.structures.test_outer_matmat import operand
from tests.singd.structures.test_properties import F64, assert_within, lowp

# (rows n, width d): unsplit, split once (a batch of 128 rows), split twice, odd halves.
GRAM_SHAPES = [(128, 255), (128, 513), (513, 513), (300, 257), (40, 1030)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "dim"), GRAM_SHAPES)
def test_symmetric_gram_is_the_gram(n, dim, dtype):
    X, X64 = lowp(torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(n)), dtype)
    gram = symmetric_gram(X)
    assert gram.shape == (dim, dim) and gram.is_contiguous()
    if _split_gram(n, dim):  # the blocks of the first split mirror each other exactly
        assert torch.equal(gram[dim // 2 :, : dim // 2], gram[: dim // 2, dim // 2 :].T)
    assert_within(gram, X64.T @ X64, X64.abs().T @ X64.abs(), dtype, "dense")


def test_symmetric_gram_writes_into_a_view():
    X = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    buffer = torch.full((300, 320), float("nan"))
    gram = symmetric_gram(X, out=buffer[:, :300])
    assert gram.data_ptr() == buffer.data_ptr()
    assert torch.isnan(buffer[:, 300:]).all()
    torch.testing.assert_close(gram, X.T @ X)


def _member(dim: int, dtype: torch.dtype) -> tuple[DenseMatrix, torch.Tensor]:
    """A non-symmetric dense S near the identity, stored in dtype, and its float64 values."""
    noise = torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(dim))
    S, S64 = lowp(torch.eye(dim, dtype=F64) + noise / dim**0.5, dtype)
    return DenseMatrix(dim, {"mat": S}), S64


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (d, n): S S^T formed first (n > 3d/4: SINGD's 512 x 513 layer) or S (S^T X) (n = 10).
@pytest.mark.parametrize(("dim", "n"), [(513, 512), (257, 512), (513, 10), (300, 226)])
def test_outer_matmat_at_the_sizes_of_the_benchmark(dim, n, dtype, layout):
    S, S64 = _member(dim, dtype)
    X, X64 = operand(dim, n, dtype, layout, seed=n)
    expected = S64 @ S64.T @ X64
    bound = S64.abs() @ S64.abs().T @ X64.abs()
    out = S.outer_matmat_(X)
    assert out.dtype == dtype and out.shape == (dim, n)
    assert_within(out, expected, bound, dtype, "dense")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_curvature_terms_at_the_sizes_of_the_benchmark(dtype):
    """``P(S^T S)`` and ``P(S^T a^T a S)`` for a 513-wide S and a batch of 128 rows ``a``:
    both Grams split into blocks."""
    S, S64 = _member(513, dtype)
    rows, rows64 = lowp(torch.randn(128, 513, dtype=F64, generator=torch.Generator()), dtype)
    inner = S.from_inner().to_dense()
    assert_within(inner, S64.T @ S64, S64.abs().T @ S64.abs(), dtype, "dense")
    curvature = S.from_inner(rows.T).to_dense()
    Y, Y_abs = rows64 @ S64, rows64.abs() @ S64.abs()
    assert_within(curvature, Y.T @ Y, Y_abs.T @ Y_abs, dtype, "dense")
