"""Dense factors' products written into spent memory, at the benchmark's sizes.

`singd_factor_update` writes ``K m_K`` into the storage of the spent ``K^T K``
(`DenseMatrix.matmul_into_`), and `singd_natural_gradient` writes ``C C^T (G K K^T)``
into the spent gradient (`dense_outer_matmat`'s ``out``). Each must be the product it
replaces bit for bit (the block-diagonal structure with one block promises exactly
dense results and computes without these buffers), and right against dense float64
algebra within the property suite's rounding bound.
"""

from __future__ import annotations

import pytest
import torch

from singd.optim.functional import singd_factor_update, singd_natural_gradient
from singd.structures import get_structure
from singd.structures.dense import FRESH_PAGES_BYTES, DenseMatrix, dense_outer_matmat
from tests.singd.dense_singd import dense_factor_update
from tests.singd.structures.test_outer_matmat import operand
from tests.singd.structures.test_properties import F64, assert_within, lowp

# One block wider than every factor here: the same matrices, through the generic paths.
ONE_BLOCK = "block1024diagonal"
LOW = [torch.float32, torch.bfloat16]


def _near_identity(dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-symmetric matrix near the identity, stored in dtype, and its float64 values."""
    noise = torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return lowp(torch.eye(dim, dtype=F64) + noise / dim**0.5, dtype)


def _gram(dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive semi-definite curvature term of rank 128 (a batch's)."""
    rows = torch.randn(128, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return lowp(rows.T @ rows / 128, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("dim", [513, 20])
def test_matmul_into_is_the_product_in_the_given_storage(dim, dtype):
    S, S64 = _near_identity(dim, dtype, seed=1)
    M, M64 = _near_identity(dim, dtype, seed=2)
    spent = DenseMatrix(dim, {"mat": torch.full((dim, dim), float("nan"), dtype=dtype)})
    product = DenseMatrix(dim, {"mat": S}).matmul_into_(DenseMatrix(dim, {"mat": M}), spent)
    assert product is spent
    assert product.tensors()["mat"].data_ptr() == spent.tensors()["mat"].data_ptr()
    assert torch.equal(product.tensors()["mat"], S @ M)
    assert_within(product.tensors()["mat"], S64 @ M64, S64.abs() @ M64.abs(), dtype, "dense")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
# (d, n): S S^T formed first (n > 3d / 4) or S (S^T X) (n = 10).
@pytest.mark.parametrize(("dim", "n"), [(513, 512), (512, 10)])
def test_outer_matmat_into_out_is_the_same_product(dim, n, dtype, layout):
    S, S64 = _near_identity(dim, dtype, seed=3)
    X, X64 = operand(dim, n, dtype, layout, seed=4)
    out = torch.empty_like(X)  # with X's layout
    fresh = dense_outer_matmat(S, X)
    result = dense_outer_matmat(S, X, out=out)
    assert result.data_ptr() == out.data_ptr() and result.shape == (dim, n)
    assert torch.equal(result, fresh)
    bound = S64.abs() @ S64.abs().T @ X64.abs()
    assert_within(result, S64 @ S64.T @ X64, bound, dtype, "dense")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_dense_factor_update_is_bitwise_the_generic_one_and_follows_the_equations(dtype):
    """A 513 x 513 K and a 512 x 512 C (the benchmark's middle layer), SINGD with momentum."""
    hp = dict(kfac_like=False, normalize_lr_cov=False, alpha1=0.5, damping=1e-3, lr_cov=1e-2)
    (K, K64), (C, C64) = _near_identity(513, dtype, seed=5), _near_identity(512, dtype, seed=6)
    (m_K, m_K64), (m_C, m_C64) = _gram(513, dtype, seed=7), _gram(512, dtype, seed=8)
    (H_K, H_K64), (H_C, H_C64) = _gram(513, dtype, seed=9), _gram(512, dtype, seed=10)
    results = {}
    for name in ("dense", ONE_BLOCK):
        cls = get_structure(name)
        operands = [cls.from_dense(M) for M in (K, C, m_K, m_C, H_K, H_C)]
        results[name] = [f.to_dense() for f in singd_factor_update(*operands, **hp)]
    for ours, generic in zip(results["dense"], results[ONE_BLOCK], strict=True):
        assert torch.equal(ours, generic)
    identity = lambda M: M  # noqa: E731
    expected = dense_factor_update(K64, C64, m_K64, m_C64, H_K64, H_C64, identity, identity, hp)
    for actual, want in zip(results["dense"], expected, strict=True):
        error = (actual.to(F64) - want).abs().max()
        # The float32 update's rounding, a few units of K's scale; bfloat16 likewise.
        assert error <= 64 * torch.finfo(dtype).eps * want.abs().max().clamp_min(1.0), error


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_dense_natural_gradient_works_in_the_spent_gradient(dtype):
    (K, K64), (C, C64) = _near_identity(513, dtype, seed=11), _near_identity(512, dtype, seed=12)
    G, G64 = lowp(
        torch.randn(512, 513, dtype=F64, generator=torch.Generator().manual_seed(13)), dtype
    )
    generic = singd_natural_gradient(
        get_structure(ONE_BLOCK).from_dense(K), get_structure(ONE_BLOCK).from_dense(C), G.clone()
    )
    grad = G.clone()
    nat = singd_natural_gradient(DenseMatrix.from_dense(K), DenseMatrix.from_dense(C), grad)
    assert nat.data_ptr() == grad.data_ptr() and nat.dtype == dtype
    assert torch.equal(nat, generic)
    expected = C64 @ C64.T @ G64 @ K64 @ K64.T
    bound = C64.abs() @ C64.abs().T @ G64.abs() @ K64.abs() @ K64.abs().T
    # Four roundings of products, each within the property suite's bound.
    assert_within(nat, expected, 4 * bound, dtype, "dense")


@pytest.mark.parametrize(("dim", "reused"), [(513, True), (20, False)])
def test_add_product_forms_the_product_in_spent_storage_from_its_threshold(dim, reused):
    """``S <- S + alpha S T``: bitwise ``add_(S @ T)``; the product lands in ``spent``'s
    storage from `FRESH_PAGES_BYTES` up (513 x 513 float32), not below (20 x 20)."""
    S, _ = _near_identity(dim, torch.float32, seed=11)
    T, _ = _near_identity(dim, torch.float32, seed=12)
    spent = DenseMatrix(dim, {"mat": torch.full((dim, dim), float("nan"))})
    expected = DenseMatrix(dim, {"mat": S.clone()}).add_(DenseMatrix(dim, {"mat": S @ T}), -0.25)
    result = DenseMatrix(dim, {"mat": S.clone()})
    assert result.add_product_(DenseMatrix(dim, {"mat": T}), alpha=-0.25, spent=spent) is result
    assert torch.equal(result.to_dense(), expected.to_dense())
    assert (spent.nbytes >= FRESH_PAGES_BYTES) == reused
    assert torch.equal(spent.tensors()["mat"], S @ T) == reused  # else still NaN
