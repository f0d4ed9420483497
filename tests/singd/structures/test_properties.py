"""One property suite for every structure: each operation against dense float64 algebra
on the projected operands, over float64, float32, bfloat16 and float16.

Operands are stored in the tested dtype; the reference upcasts exactly those stored
values to float64 and computes densely, so the only differences are the rounding errors
of the fast path. Errors are bounded entrywise by ``TOL[dtype]`` times the same
computation on absolute values (the standard bound ``|fl(AB) - AB| <= c u |A||B|``),
which follows the dtype's unit roundoff. FFT-based Toeplitz results are accurate in
norm, not entry by entry, so they are compared against the largest entry of that bound
times log2(2d).
"""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import Tensor

from singd.structures import get_structure
from tests.singd.structures.cases import (
    CASE_IDS,
    CASES,
    DTYPES,
    TOEPLITZ,
    random_structured,
    random_symmetric,
    reference_projection,
    storage_formula,
    support,
)

F64 = torch.float64
# A few roundings of the unit roundoff u = eps / 2 per operation (inputs are exact).
TOL = {dtype: 8 * torch.finfo(dtype).eps for dtype in DTYPES}
ROWS = 7  # n, the rows of X in P(X^T X) and P(S^T X^T X S)

parametrize_cases = pytest.mark.parametrize(("name", "dim"), CASES, ids=CASE_IDS)
parametrize_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor, dtype, name: str) -> None:
    """``|actual - expected| <= TOL[dtype] * bound`` entrywise (normwise for Toeplitz)."""
    assert actual.dtype == dtype or actual.dtype == F64, actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.to(F64) - expected).abs()
    if name in TOEPLITZ:
        allowed = (
            TOL[dtype] * math.log2(2 * expected.shape[0]) * bound.max() * torch.ones_like(bound)
        )
    else:
        allowed = TOL[dtype] * bound
    worst = (error - allowed).max()
    assert worst <= 0, (
        f"error {error.max().item():.3g} exceeds {TOL[dtype]:.3g} x bound "
        f"(ratio {(error / bound.clamp_min(1e-300)).max().item():.3g})"
    )


def lowp(X: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """X stored in dtype, and those stored values in float64."""
    stored = X.to(dtype)
    return stored, stored.to(F64)


def project(name: str, M: Tensor) -> Tensor:
    return reference_projection(name, M)


@parametrize_dtypes
@parametrize_cases
def test_from_dense_follows_the_projection_rule(name, dim, dtype):
    generator = torch.Generator().manual_seed(1)
    M, M64 = lowp(torch.randn(dim, dim, dtype=F64, generator=generator), dtype)
    P = get_structure(name).from_dense(M)
    assert P.dtype == dtype and P.dim == dim
    assert_within(P.to_dense(), project(name, M64), project(name, M64.abs()), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_projection_keeps_members_of_the_structure(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=2)
    assert not (S64 != 0).logical_and(~support(type(S), dim)).any()
    again = type(S).from_dense(S.to_dense())
    assert_within(again.to_dense(), S64, S64.abs(), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_storage_matches_the_reference_table(name, dim, dtype):
    cls = get_structure(name)
    S = cls.zeros(dim, dtype=dtype)
    entries = storage_formula(name, dim)
    assert cls.storage_entries(dim) == entries
    assert S.num_entries == entries == sum(t.numel() for t in S.tensors().values())
    assert S.nbytes == entries * torch.finfo(dtype).bits // 8
    held = int(support(cls, dim).sum())
    assert held == (dim * (dim + 1) // 2 if name in TOEPLITZ else entries)


@parametrize_dtypes
@parametrize_cases
def test_state_is_plain_tensors_that_load_with_weights_only(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=3)
    buffer = io.BytesIO()
    torch.save(S.tensors(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert all(type(t) is Tensor for t in loaded.values())
    again = type(S).from_tensors(dim, loaded)
    assert torch.equal(again.to_dense().to(F64), S64)


@pytest.mark.parametrize(("name", "dim"), CASES[::3], ids=CASE_IDS[::3])
def test_pickles_by_name(name, dim):
    S, S64 = random_structured(name, dim, torch.float32, seed=3)
    again = pickle.loads(pickle.dumps(S))
    assert type(again) is type(S) and torch.equal(again.to_dense().to(F64), S64)


@parametrize_cases
def test_results_own_exactly_their_stored_bytes(name, dim):
    """No stored tensor is a view into a larger buffer (an FFT's padding, a dense
    matrix): ``nbytes`` is then the memory held and a saved state holds nothing more."""
    cls = get_structure(name)
    S, _ = random_structured(name, dim, torch.float32, seed=17)
    T, _ = random_structured(name, dim, torch.float32, seed=18)
    X = torch.randn(ROWS, dim)
    A = random_symmetric(dim, torch.Generator().manual_seed(19)).float()
    results = {
        "from_dense": cls.from_dense(A),
        "from_gram": cls.from_gram(X),
        "from_inner(X)": S.from_inner(X.T),
        "from_inner()": S.from_inner(),
        "from_inner2": S.from_inner2(A),
        "S @ T": S @ T,
        "eye": cls.eye(dim),
        "zeros": cls.zeros(dim),
        "clone": S.clone(),
        "to": S.to(dtype=torch.float64),
    }
    for operation, result in results.items():
        held = sum(t.untyped_storage().nbytes() for t in result.tensors().values())
        assert held == result.nbytes, f"{operation} holds {held} B for {result.nbytes} B"


@parametrize_dtypes
@parametrize_cases
def test_matmat_and_rmatmat(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=4)
    X, X64 = lowp(torch.randn(dim, ROWS, dtype=F64), dtype)
    out = S @ X
    assert out.dtype == dtype
    assert_within(out, S64 @ X64, S64.abs() @ X64.abs(), dtype, name)
    out = S.rmatmat(X)
    assert out.dtype == dtype
    assert_within(out, S64.T @ X64, S64.abs().T @ X64.abs(), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_structured_product(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=5)
    T, T64 = random_structured(name, dim, dtype, seed=6)
    out = S @ T
    assert type(out) is type(S) and out.dtype == dtype
    assert_within(out.to_dense(), S64 @ T64, S64.abs() @ T64.abs(), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_in_place_arithmetic(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=7)
    T, T64 = random_structured(name, dim, dtype, seed=8)
    eye = torch.eye(dim, dtype=F64)
    assert S.add_(T, alpha=-0.75) is S
    expected, bound = S64 - 0.75 * T64, S64.abs() + 0.75 * T64.abs()
    assert_within(S.to_dense(), expected, bound, dtype, name)
    assert S.mul_(-1.5) is S
    expected, bound = -1.5 * expected, 1.5 * bound
    assert_within(S.to_dense(), expected, bound, dtype, name)
    assert S.diag_add_(0.25) is S
    expected, bound = expected + 0.25 * eye, bound + 0.25 * eye
    assert_within(S.to_dense(), expected, bound, dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_from_gram(name, dim, dtype):
    X, X64 = lowp(torch.randn(ROWS, dim, dtype=F64), dtype)
    out = get_structure(name).from_gram(X)
    assert out.dtype == dtype
    expected = project(name, X64.T @ X64)
    assert_within(out.to_dense(), expected, project(name, X64.abs().T @ X64.abs()), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_from_inner(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=9)
    X, X64 = lowp(torch.randn(ROWS, dim, dtype=F64), dtype)
    out = S.from_inner(X.T)
    assert type(out) is type(S) and out.dtype == dtype
    expected = project(name, S64.T @ X64.T @ X64 @ S64)
    XS_abs = X64.abs() @ S64.abs()
    assert_within(out.to_dense(), expected, project(name, XS_abs.T @ XS_abs), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_from_inner_without_x_is_projected_s_transpose_s(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=10)
    out = S.from_inner()
    assert type(out) is type(S) and out.dtype == dtype
    expected = project(name, S64.T @ S64)
    assert_within(out.to_dense(), expected, project(name, S64.abs().T @ S64.abs()), dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_from_inner2(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=11)
    A, A64 = lowp(random_symmetric(dim, torch.Generator().manual_seed(12)), dtype)
    out = S.from_inner2(A)
    assert type(out) is type(S) and out.dtype == dtype
    expected = project(name, S64.T @ A64 @ S64)
    bound = project(name, S64.abs().T @ A64.abs() @ S64.abs())
    assert_within(out.to_dense(), expected, bound, dtype, name)


@parametrize_dtypes
@parametrize_cases
def test_reductions(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=13)
    diagonal = S.diagonal()
    assert diagonal.shape == (dim,) and diagonal.dtype == dtype
    assert torch.equal(diagonal.to(F64), S64.diagonal())
    mean = S64.diagonal().abs().mean().reshape(1)
    assert_within(S.average_trace().reshape(1), S64.diagonal().mean().reshape(1), mean, dtype, "")
    assert S.infinity_vector_norm().to(F64) == S64.abs().max()
    norm = torch.linalg.matrix_norm(S64).reshape(1)
    assert_within(S.frobenius_norm().reshape(1), norm, norm, dtype, "")


@parametrize_dtypes
@parametrize_cases
def test_extreme_singular_values_in_float64(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=14)
    sigma_max, sigma_min = S.extreme_singular_values()
    assert sigma_max.dtype == sigma_min.dtype == F64
    values = torch.linalg.svdvals(S64)
    torch.testing.assert_close(sigma_max, values.max(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sigma_min, values.min(), rtol=1e-8, atol=1e-12 * values.max())


@parametrize_dtypes
@parametrize_cases
def test_identity_zero_copies(name, dim, dtype):
    cls = get_structure(name)
    assert torch.equal(cls.eye(dim, dtype=dtype).to_dense().to(F64), torch.eye(dim, dtype=F64))
    assert torch.equal(cls.zeros(dim, dtype=dtype).to_dense().to(F64), torch.zeros(dim, dim))
    S, S64 = random_structured(name, dim, dtype, seed=15)
    copy, wide = S.clone(), S.to(dtype=F64)
    assert wide.dtype == F64 and torch.equal(wide.to_dense(), S64)
    copy.mul_(0.0)
    wide.mul_(0.0)
    assert torch.equal(S.to_dense().to(F64), S64), "clone() and to() must not share storage"


@pytest.mark.parametrize("name", sorted({name for name, _ in CASES}))
def test_non_finite_matrices_report_nan_singular_values(name):
    S = get_structure(name).eye(4, dtype=torch.float32)
    stored = next(t for t in S.tensors().values() if t.numel() > 0)
    stored.view(-1)[0] = float("nan")
    assert all(math.isnan(value) for value in S.extreme_singular_values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@parametrize_cases
def test_cuda_agrees_with_cpu(name, dim, dtype):
    S, S64 = random_structured(name, dim, dtype, seed=16)
    X, X64 = lowp(torch.randn(ROWS, dim, dtype=F64), dtype)
    G = S.to(device="cuda")
    assert G.device.type == "cuda"
    out = G.from_inner(X.T.cuda()).to(device="cpu")
    expected = project(name, S64.T @ X64.T @ X64 @ S64)
    XS_abs = X64.abs() @ S64.abs()
    assert_within(out.to_dense(), expected, project(name, XS_abs.T @ XS_abs), dtype, name)
    out = (G @ X.T.cuda()).cpu()
    assert_within(out, S64 @ X64.T, S64.abs() @ X64.abs().T, dtype, name)
    product = (G @ G).to(device="cpu").to_dense()
    assert_within(product, S64 @ S64, S64.abs() @ S64.abs(), dtype, name)
