"""The contrast the toolkit exists for: float16 KFAC inverts, float16 SINGD does not.

Setting: an MLP 64-32-10 on scikit-learn's handwritten digits, float32 weights, float16
factors, damping ``lambda = 1e-10``, batch 32.

What the arithmetic says: some pixels are zero in every digit (the top-left corner, for
one), so the row and column of that pixel in KFAC's input factor ``A`` are exactly zero, as are
those of dead ReLU units in the next layer's ``A`` and the first layer's ``G``; the damped
factor holds ``sqrt(lambda) = 1e-5`` there, which float16 stores as the subnormal
``168 * 2^-24 = 1.0014e-5``. Its inverse, about 99864, is beyond float16's largest finite
value 65504: LAPACK computes it correctly in float32 and the cast to float16 stores inf.
The gradient of such a row is exactly zero and ``0 * inf`` is NaN, so the very first
update is not finite. Besides, the first layer's ``A`` rounded to float16 is not even
positive definite (smallest eigenvalue about -2.3e-4, far below the damping): Cholesky
and eigh fail on it and keep the identity, a counted failure. Newton-Schulz in float16
cannot hold iterates with entries near 1e5, so it fails on every factor with a zero row
(those layers then take plain gradient steps and stay finite: the failure handling works
as designed, and the counter is what shows the breakage).

With float32 factors the same inverse (1e5) is finite: the failure is one of precision.
SINGD never inverts: damping enters its update as ``lambda avg(C^T C) K^T K``, a tiny
additive term, and its float16 factors stay finite over 30 steps with the same data.
"""

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from singd import KFAC, SINGD
from singd.optim.inverses import INVERSE_METHODS

DAMPING = 1e-10
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0  # float32 values from here on round to inf in float16


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def batches(digits, steps: int):
    x, y = digits
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (32,), generator=gen)
        yield x[rows], y[rows]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train_step(model, optimizer, x, y) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_the_premise_holds_in_the_data_and_in_float16(digits):
    x, _ = digits
    assert (x[:, 0] == 0).all()
    stored = torch.tensor(math.sqrt(DAMPING), dtype=torch.float16).item()
    assert stored == 168 * 2.0**-24
    assert 1.0 / stored > FP16_OVERFLOW


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_float16_kfac_breaks_on_its_first_update_where_the_arithmetic_says(digits, method):
    model = mlp()
    opt = KFAC(
        model, lr=0.05, damping=DAMPING, T=1, inverse_method=method, factor_dtype=torch.float16
    )
    x, y = next(batches(digits, 1))
    train_step(model, opt, x, y)
    broken = 0
    for view in opt.curvature_state():
        must_fail = 0
        for key in ("A", "G"):
            damped, inverse = view.factors[key], view.factors[f"{key}_inv"]
            eye = torch.eye(len(damped), dtype=torch.float16)
            # The exact inverse of the stored float16 matrix, and which of its entries
            # float16 can hold, with a margin for float32's own error (kappa * eps).
            exact = torch.linalg.inv(damped.double())
            eigenvalues = torch.linalg.eigvalsh(damped.double())
            kappa = float(eigenvalues.abs().max() / eigenvalues.abs().min())
            margin = min(0.5, 10 * kappa * torch.finfo(torch.float32).eps)
            overflow = exact.abs() > FP16_OVERFLOW * (1 + margin)
            fits = exact.abs() < FP16_MAX * (1 - margin)
            if method == "newton-schulz":
                if overflow.any():  # no float16 iterate can hold the inverse
                    must_fail += 1
                    assert torch.equal(inverse, eye), (view.name, key)
            elif method in ("cholesky", "eigh") and eigenvalues.min() <= 0:
                # Rounding a^T a to float16 lost definiteness: a counted failure.
                must_fail += 1
                assert torch.equal(inverse, eye), (view.name, key)
            else:
                assert torch.isinf(inverse[overflow]).all(), (view.name, key)
                assert torch.isfinite(inverse[fits]).all(), (view.name, key)
                broken += bool(overflow.any())
        failed = view.counters["failed_decompositions"]
        if method == "newton-schulz":  # it may also fail on ill-conditioned factors
            assert failed >= must_fail, view.name
        else:
            assert failed == must_fail, view.name
    params_finite = all(torch.isfinite(p).all() for p in model.parameters())
    if method == "newton-schulz":
        # Every factor with a zero row failed, so those layers took plain gradient steps.
        assert opt.failed_decompositions > 0 and params_finite
    else:
        # A stored inf meets a zero gradient entry: 0 * inf = NaN in the update.
        assert broken > 0 and not params_finite


def test_float32_factors_invert_the_same_matrix_finitely(digits):
    model = mlp()
    opt = KFAC(model, lr=0.05, damping=DAMPING, T=1, factor_dtype=torch.float32)
    x, y = next(batches(digits, 1))
    train_step(model, opt, x, y)
    first = opt.curvature_state()[0]
    assert first.factors["A_inv"][0, 0].item() == pytest.approx(1e5, rel=1e-4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.failed_decompositions == 0


def test_float16_singd_stays_finite_on_the_same_model_data_and_damping(digits):
    model = mlp()
    opt = SINGD(
        model, lr=0.05, damping=DAMPING, T=1, preconditioner_dtype=(torch.float16, torch.float16)
    )
    losses = [train_step(model, opt, x, y) for x, y in batches(digits, 30)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for view in opt.curvature_state():
        for factor in view.factors.values():
            assert factor.dtype == torch.float16
            assert all(torch.isfinite(t).all() for t in factor.tensors().values())
