"""The functional core (`singd.optim.functional`) against the paper's equations, written
densely in float64 (REFERENCE.md "The update, as the reference computes it").

Operands are members of each structure, stored in the tested dtype; the reference
upcasts exactly those stored values and computes with dense matrices, projecting with
`reference_projection` (the rule written out entry by entry, not the structures' code).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from singd.optim.functional import heavy_ball_, singd_factor_update, singd_natural_gradient
from singd.structures import STRUCTURE_NAMES, get_structure
from tests.singd.dense_singd import dense_factor_update
from tests.singd.structures.cases import random_structured, random_symmetric, reference_projection

F64 = torch.float64
TOL = {F64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2}
DIM_K, DIM_C = 6, 4
SETTINGS = {
    "singd": dict(kfac_like=False, normalize_lr_cov=False, alpha1=0.5),
    "singd-normalized": dict(kfac_like=False, normalize_lr_cov=True, alpha1=0.5),
    "singd-no-momentum": dict(kfac_like=False, normalize_lr_cov=False, alpha1=0.0),
    "ikfac": dict(kfac_like=True, normalize_lr_cov=False, alpha1=0.0),
    "ikfac-normalized": dict(kfac_like=True, normalize_lr_cov=True, alpha1=0.0),
}


def curvature(name: str, dim: int, dtype: torch.dtype, seed: int):
    """A projected positive semi-definite curvature term, structured and dense."""
    generator = torch.Generator().manual_seed(seed)
    M = random_symmetric(dim, generator)
    gram = reference_projection(name, M @ M.T)
    return get_structure(name).from_dense(gram).to(dtype=dtype), gram.to(dtype).to(F64)


def reference_update(name_K, name_C, K, C, m_K, m_C, H_K, H_C, hp, scale_K, scale_C):
    """The paper's update of ``(K, C, m_K, m_C)``, dense float64, H scaled first."""
    P_K = lambda M: reference_projection(name_K, M)  # noqa: E731
    P_C = lambda M: reference_projection(name_C, M)  # noqa: E731
    return dense_factor_update(K, C, m_K, m_C, scale_K * H_K, scale_C * H_C, P_K, P_C, hp)


def assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    error = (actual.to(F64) - expected).abs().max()
    assert error <= TOL[dtype] * scale, (error, scale)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_factor_update_follows_the_equations_in_float64(name, setting):
    _check_factor_update(name, "dense" if name != "dense" else "diagonal", F64, setting)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["dense", "diagonal", "hierarchical15_15"])
def test_factor_update_in_low_precision_stays_within_its_rounding(name, dtype):
    _check_factor_update(name, name, dtype, "singd-normalized")


def _check_factor_update(name_K, name_C, dtype, setting):
    hp = dict(SETTINGS[setting], damping=0.1, lr_cov=0.3)
    K, K64 = random_structured(name_K, DIM_K, dtype, seed=1)
    C, C64 = random_structured(name_C, DIM_C, dtype, seed=2)
    m_K, m_K64 = curvature(name_K, DIM_K, dtype, seed=3)
    m_C, m_C64 = curvature(name_C, DIM_C, dtype, seed=4)
    H_K, H_K64 = curvature(name_K, DIM_K, dtype, seed=5)
    H_C, H_C64 = curvature(name_C, DIM_C, dtype, seed=6)
    scale_K, scale_C = 0.5, 3.0
    expected = reference_update(
        name_K, name_C, K64, C64, m_K64, m_C64, H_K64, H_C64, hp, scale_K, scale_C
    )
    result = singd_factor_update(K, C, m_K, m_C, H_K, H_C, **hp, scale_K=scale_K, scale_C=scale_C)
    assert result.K is K and result.C is C  # updated in place
    for actual, want in zip(result, expected, strict=True):
        assert_close(actual.to_dense(), want, dtype)


def test_factor_update_takes_a_scale_on_the_device():
    """A GradScaler's un-scaling arrives as a float64 0-d tensor and gives the same update."""
    results = []
    for scale_C in (2.0, torch.tensor(2.0, dtype=F64)):
        K, _ = random_structured("dense", DIM_K, F64, seed=1)
        C, _ = random_structured("dense", DIM_C, F64, seed=2)
        H_K, _ = curvature("dense", DIM_K, F64, seed=5)
        H_C, _ = curvature("dense", DIM_C, F64, seed=6)
        out = singd_factor_update(
            K,
            C,
            None,
            None,
            H_K,
            H_C,
            lr_cov=0.1,
            alpha1=0.0,
            damping=0.01,
            kfac_like=False,
            normalize_lr_cov=False,
            scale_C=scale_C,
        )
        results.append([f.to_dense() for f in out])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


PAIRS = [("dense", "dense"), ("diagonal", "diagonal"), ("hierarchical15_15", "diagonal")]


@pytest.mark.parametrize("names", [*PAIRS, ("dense", "triltoeplitz")])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_natural_gradient_is_C_CT_G_K_KT(names, dtype):
    K, K64 = random_structured(names[0], DIM_K, dtype, seed=7)
    C, C64 = random_structured(names[1], DIM_C, dtype, seed=8)
    G = torch.randn(DIM_C, DIM_K, generator=torch.Generator().manual_seed(9)).to(dtype)
    expected = C64 @ C64.T @ G.to(F64) @ K64 @ K64.T
    actual = singd_natural_gradient(K, C, G.clone())
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_heavy_ball_matches_the_plain_recurrence(momentum, weight_decay):
    generator = torch.Generator().manual_seed(10)
    params = [torch.randn(3, 4, generator=generator, dtype=F64) for _ in range(2)]
    plain = [p.clone() for p in params]
    buffers = [None, None]
    state: defaultdict = defaultdict(dict)  # as torch.optim.Optimizer.state
    for _ in range(3):
        directions = [torch.randn(p.shape, generator=generator, dtype=F64) for p in params]
        for i, (p, d) in enumerate(zip(plain, directions, strict=True)):
            step = d + weight_decay * p
            buffers[i] = step if buffers[i] is None else momentum * buffers[i] + step
            plain[i] = p - 0.1 * (buffers[i] if momentum else step)
        heavy_ball_(
            params,
            [d.clone() for d in directions],
            state,
            lr=0.1,
            momentum=momentum,
            weight_decay=weight_decay,
        )
    for p, q in zip(params, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert bool(state) is (momentum != 0.0)  # no buffers without momentum
