"""Condition numbers against dense float64 SVD; residual and precision error by hand."""

import math
import time

import pytest
import torch
from torch import nn

import probes
from probes.condition import (
    condition_rows,
    inversion_residual,
    precondition_error,
    square_name,
)
from singd import SINGD
from singd.curvature import KFAC_ROLES, SINGD_ROLES, FactorRole, LayerCurvature
from singd.optim.kfac import KFAC
from singd.structures import get_structure

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dense64(factor) -> torch.Tensor:
    dense = factor if isinstance(factor, torch.Tensor) else factor.to_dense()
    return dense.to(torch.float64)


def _trained(optimizer_factory, dtype, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5)).to(dtype)
    optimizer = optimizer_factory(model)
    x, y = torch.randn(32, 7, dtype=dtype), torch.randint(0, 5, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()
    return model, optimizer


def _by_key(rows):
    return {(module, tensor, metric): value for module, tensor, metric, value, _, _ in rows}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structure", ["diagonal", "dense", "block4diagonal", "hierarchical3_2"])
def test_singd_condition_matches_dense_svd(structure, dtype):
    _, optimizer = _trained(
        lambda m: SINGD(m, lr=0.05, lr_cov=0.1, T=1, structures=(structure, structure)), dtype
    )
    layers = optimizer.curvature_state()
    got = _by_key(condition_rows(layers))
    conditions = []
    for layer in layers:
        for name, square in (("K", "KKT"), ("C", "CCT")):
            dense = _dense64(layer.factors[name])
            sv = torch.linalg.svdvals(dense)
            conditions.append(float(sv.max() / sv.min()))
            key = (layer.name, name, "condition_number")
            assert got[key] == pytest.approx(float(sv.max() / sv.min()), rel=1e-9)
            assert got[(layer.name, name, "sigma_min")] == pytest.approx(float(sv.min()), rel=1e-9)
            sq = torch.linalg.svdvals(dense @ dense.T)
            assert got[(layer.name, square, "condition_number")] == pytest.approx(
                float(sq.max() / sq.min()), rel=1e-8
            )
            want_max = float(sq.max())
            assert got[(layer.name, square, "sigma_max")] == pytest.approx(want_max, rel=1e-9)
        assert not any(key[1] in ("m_K", "m_C") for key in got)
    assert max(conditions) > 1.001, "the factors moved away from the identity"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kfac_condition_and_inversion_residual(dtype):
    _, optimizer = _trained(lambda m: KFAC(m, lr=0.05, T=1, damping=1e-2), dtype)
    layers = optimizer.curvature_state()
    got = _by_key(condition_rows(layers))
    for layer in layers:
        for name in ("A", "G", "A_inv", "G_inv"):
            sv = torch.linalg.svdvals(_dense64(layer.factors[name]))
            key = (layer.name, name, "condition_number")
            assert got[key] == pytest.approx(float(sv.max() / sv.min()), rel=1e-8)
        for name, inverse in (("A", "A_inv"), ("G", "G_inv")):
            S, S_inv = layer.factors[name], layer.factors[inverse]
            eye = torch.eye(S.shape[0], dtype=S_inv.dtype)
            want = torch.linalg.matrix_norm((S.to(S_inv.dtype) @ S_inv - eye).double())
            assert got[(layer.name, inverse, "inversion_residual")] == pytest.approx(float(want))
            # A float32 factor inverted in float32 (the default inverse_dtype) inverts
            # well; with the factor stored in bfloat16 the residual measured 0.016 here:
            # the bfloat16 rounding of A + sI, which is what the probe is there to show.
            bound = 1e-4 if dtype == torch.float32 else 0.1
            assert got[(layer.name, inverse, "inversion_residual")] < bound


def test_inversion_residual_by_hand():
    S = torch.diag(torch.tensor([2.0, 4.0]))
    assert inversion_residual(S, torch.diag(torch.tensor([0.5, 0.25]))) == 0.0
    assert inversion_residual(S, torch.diag(torch.tensor([0.5, 0.275]))) == pytest.approx(0.1)


def test_precondition_error_by_hand():
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    delta = torch.tensor([[0.0, 0.5], [0.0, 0.0]])  # orthogonal to g in the Frobenius sense

    def precondition(m):
        return m if m.dtype == torch.float64 else m + delta.to(m.dtype)

    rel, angle = precondition_error(precondition, g, torch.float32)
    assert rel == pytest.approx(0.5 / 5.0)
    assert angle == pytest.approx(math.atan2(0.5, 5.0), rel=1e-6)
    rel16, angle16 = precondition_error(lambda m: m, torch.tensor([[1 + 2**-9]]), torch.bfloat16)
    assert rel16 == pytest.approx(2**-9 / (1 + 2**-9)) and angle16 == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_singd_precondition_error_follows_the_dtype(dtype):
    _, optimizer = _trained(lambda m: SINGD(m, lr=0.05, T=1, structures=("dense", "dense")), dtype)
    got = _by_key(condition_rows(optimizer.curvature_state()))
    errors = [v for (_, t, metric), v in got.items() if metric == "precond_rel_error"]
    angles = [v for (_, t, metric), v in got.items() if metric == "precond_angle"]
    assert len(errors) == 2 and len(angles) == 2
    eps = torch.finfo(dtype).eps
    # Four products of small matrices: the error is a few roundings, not zero nor O(1).
    assert all(0 < e < 50 * eps for e in errors), errors
    assert all(0 <= a < 50 * eps for a in angles), angles


def test_large_diagonal_and_block_factors_need_no_dense_decomposition():
    dim = 4096
    diag = get_structure("diagonal").from_dense(torch.diag(torch.linspace(1.0, 5.0, dim)))
    block = get_structure("block32diagonal").eye(dim)
    block.mul_(3.0)
    layer = LayerCurvature(
        name="big",
        kind="singd",
        factors={"K": diag, "C": block},
        damping={"K": 0.0, "C": 0.0},
        counters={},
        gradient=None,
        precondition=lambda g: g,
        roles={"K": SINGD_ROLES["K"], "C": SINGD_ROLES["C"]},
    )
    start = time.perf_counter()
    got = _by_key(condition_rows([layer]))
    elapsed = time.perf_counter() - start
    assert got[("big", "K", "condition_number")] == pytest.approx(5.0)
    assert got[("big", "CCT", "condition_number")] == pytest.approx(1.0)
    # A dense float64 SVD of 4096 x 4096 takes tens of seconds here.
    assert elapsed < 1.0


def test_session_records_condition_at_its_cadence_and_summary_max():
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5))
    optimizer = SINGD(model, lr=0.05, T=1, structures=("diagonal", "dense"))
    x, y = torch.randn(32, 7), torch.randint(0, 5, (32,))
    with probes.attach(model, optimizer, probes=["condition"], every=3) as session:
        for _ in range(7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    frame = session.to_frame()
    cond = frame[frame["metric"] == "condition_number"]
    assert sorted(cond["step"].unique()) == [0, 3, 6]
    assert session.summary()["max_condition"] == pytest.approx(cond["value"].max())
    assert cond["value"].max() == cond[cond["tensor"].isin(["KKT", "CCT"])]["value"].max()


@pytest.mark.parametrize("optimizer_factory", [lambda m: SINGD(m, T=1), lambda m: KFAC(m, T=1)])
def test_condition_rows_follow_roles_not_names(optimizer_factory):
    """Renaming every factor renames the rows and changes nothing else: the probe reads
    the roles (`singd.curvature.FactorRole`), not SINGD's or KFAC's names."""
    _, optimizer = _trained(optimizer_factory, torch.float64)
    layers = optimizer.curvature_state()
    renamed = [
        LayerCurvature(
            name=layer.name,
            kind=layer.kind,
            factors={f"x{name}": f for name, f in layer.factors.items()},
            damping=layer.damping,
            counters=layer.counters,
            gradient=layer.gradient,
            precondition=layer.precondition,
            roles={f"x{name}": role for name, role in layer.roles.items()},
        )
        for layer in layers
    ]
    original, new = condition_rows(layers), condition_rows(renamed)
    names = {"update": "update"}
    for name, role in layers[0].roles.items():
        names[name] = f"x{name}"
        if role.kind == "preconditioner":
            names[square_name(name)] = square_name(f"x{name}")
    assert len(original) == len(new) > 0
    for (m, t, metric, value, unit, dt), row in zip(original, new, strict=True):
        assert row[:3] == (m, names[t], metric) and row[4:] == (unit, dt)
        assert row[3] == value or (math.isnan(row[3]) and math.isnan(value))


def test_roles_say_side_and_kind_of_every_factor():
    assert {r.kind for r in SINGD_ROLES.values()} == {"preconditioner", "momentum"}
    assert {r.kind for r in KFAC_ROLES.values()} == {"statistic", "inverse"}
    for roles in (SINGD_ROLES, KFAC_ROLES):
        assert sorted(r.side for r in roles.values()) == ["input"] * 2 + ["output"] * 2
    _, optimizer = _trained(lambda m: KFAC(m, T=1), torch.float64)
    layer = optimizer.curvature_state()[0]
    assert list(layer.named("inverse", "output")) == ["G_inv"]
    assert layer.roles["A"] == FactorRole("input", "statistic")
