"""precision="auto": a factor widened before its dtype fails (singd.optim.precision).

The breaking case: a two-layer MLP whose inputs are scaled by 30, KFAC with damping
1e-10 (a shift of 1e-5 on the factors' diagonals) and float16 factors. With
precision=None the output-side inverse exceeds float16's largest finite number, is
stored as inf and the loss becomes NaN; float32 factors train. With "auto" the factors
are widened at the first update and the run trains.

Tolerance on the loss against the float32 run: the auto run forms its first factors in
float16 (before any reading exists), and with a shift of 1e-5 the preconditioner
amplifies that first rounding by up to kappa ~ 1e5, so the two trajectories are not
expected to agree to rounding; what must agree is the outcome. Both runs end below
5% of the first loss (1.15): a run that broke ends at NaN or above its first loss,
and the float32 run ends at 0.068, so 0.05 of the first loss separates "learned as the
float32 run did" from any failure by an order of magnitude.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.optim.precision import (
    CONDITION_BOUND,
    RANGE_BITS,
    readings,
    verdict,
    widenings,
)
from tests.host_reads import HostReads


def train(optimizer_cls, steps: int = 30, scale: float = 30.0, state=None, **kwargs):
    """Losses, optimizer and model of a small MLP trained with T=1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    x, y = torch.randn(64, 10) * scale, torch.randint(3, (64,))
    optimizer = optimizer_cls(model, lr=0.05, T=1, **kwargs)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, optimizer, model


BREAKING = dict(damping=1e-10, factor_dtype=torch.float16)


def test_kfac_float16_breaks_without_auto_and_holds_with_it():
    broken, plain, _ = train(KFAC, **BREAKING)
    held, auto, _ = train(KFAC, **BREAKING, precision="auto")
    control, _, _ = train(KFAC, damping=1e-10, factor_dtype=torch.float32)
    assert not math.isfinite(broken[-1]) and plain.precision_events == []
    assert math.isfinite(control[-1]) and control[-1] < 0.1 * control[0]
    events = auto.precision_events
    assert events and all(e.from_dtype == "float16" and e.to_dtype == "float32" for e in events)
    # The overflowing output-side inverse is among them, widened at the first update.
    assert any(e.factor == "G_inv" and e.step == 0 for e in events)
    assert all(math.isfinite(loss) for loss in held)
    assert abs(held[-1] - control[-1]) < 0.05 * control[0]
    # Each escalated factor is stored in its new dtype, the others stay float16.
    state = auto._factors
    for e in events:
        assert state[e.layer][e.factor].dtype == torch.float32
    assert auto.state_bytes()["factors"] > plain.state_bytes()["factors"]


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (KFAC, dict(factor_dtype=torch.float32)),
        (KFAC, dict(damping=1.0, factor_dtype=torch.bfloat16)),
        (SINGD, dict(preconditioner_dtype=(torch.bfloat16, torch.bfloat16))),
        (SINGD, dict(structures=("diagonal", "dense"))),
    ],
    ids=["kfac-fp32", "kfac-bf16-damped", "singd-bf16", "singd-fp32"],
)
def test_healthy_run_escalates_nothing_and_equals_precision_none(optimizer_cls, kwargs):
    plain, _, plain_model = train(optimizer_cls, steps=10, scale=1.0, **kwargs)
    auto_losses, auto, auto_model = train(
        optimizer_cls, steps=10, scale=1.0, precision="auto", **kwargs
    )
    assert auto.precision_events == []
    assert auto_losses == plain
    for p, q in zip(plain_model.parameters(), auto_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_after_escalation_resumes_bit_for_bit():
    _, optimizer, model = train(KFAC, steps=3, **BREAKING, precision="auto")
    assert optimizer.precision_events
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    _, resumed, resumed_model = train(KFAC, steps=0, **BREAKING, precision="auto")
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.precision_events == optimizer.precision_events
    for name, factors in optimizer._factors.items():
        for key, value in factors.items():
            assert resumed._factors[name][key].dtype == value.dtype
            assert torch.equal(resumed._factors[name][key], value)

    torch.manual_seed(1)
    x, y = torch.randn(64, 10) * 30.0, torch.randint(3, (64,))
    for opt, net in ((optimizer, model), (resumed, resumed_model)):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_precision_none_refuses_an_escalated_checkpoint():
    _, optimizer, _ = train(KFAC, steps=1, **BREAKING, precision="auto")
    _, plain, _ = train(KFAC, steps=0, **BREAKING)
    with pytest.raises(ValueError, match="float32 in the checkpoint but torch.float16"):
        plain.load_state_dict(optimizer.state_dict())


def test_auto_reads_the_host_once_per_update_step():
    _, optimizer, model = train(KFAC, steps=1, scale=1.0, precision="auto")
    x, y = torch.randn(8, 10), torch.randint(3, (8,))
    optimizer.param_groups[0]["T"] = 2
    with HostReads() as reads:
        for _ in range(4):  # steps 1..4: two of them update
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert reads.count == 2


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be None or 'auto'"):
        KFAC(nn.Linear(2, 2), precision="fp64")


# ----------------------------------------------------------- the readings and bounds
def reference_kappa_1(matrix: torch.Tensor) -> float:
    """||M||_1 ||M^-1||_1 in float64, column sums written out."""
    m = matrix.to(torch.float64)
    inv = torch.linalg.inv(m)
    return max(m.abs().sum(0)).item() * max(inv.abs().sum(0)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_condition_bound_against_float64(dtype):
    eps = torch.finfo(dtype).eps
    for kappa in (0.5 * CONDITION_BOUND / eps, 2.0 * CONDITION_BOUND / eps):
        m = torch.diag(torch.tensor([1.0, 1.0 / kappa], dtype=torch.float64))
        m[0, 1] = m[1, 0] = 1e-3 / kappa
        stored = m.to(dtype)
        value = readings(stored, inverse=torch.linalg.inv(m).to(dtype)).tolist()
        expected = reference_kappa_1(m) * eps
        assert value[4] == pytest.approx(expected, rel=8 * eps)
        crossed = verdict(value, dtype)
        assert (crossed is not None and crossed[0] == "condition") == (expected > CONDITION_BOUND)


def test_range_bounds():
    top = torch.finfo(torch.float16).max / 2.0**RANGE_BITS
    for amax, crossed in ((0.9 * top, False), (1.1 * top, True)):
        m = torch.tensor([[amax, 0.0], [0.0, 1.0]], dtype=torch.float16)
        found = verdict(readings(m, diagonal=m.diagonal()).tolist(), torch.float16)
        assert (found is not None and found[0] == "amax") == crossed
    tiny = torch.finfo(torch.bfloat16).tiny * 2.0**RANGE_BITS
    for low, crossed in ((2.0 * tiny, False), (0.5 * tiny, True)):
        m = torch.tensor([[1.0, 0.0], [0.0, low]], dtype=torch.bfloat16)
        found = verdict(readings(m, diagonal=m.diagonal()).tolist(), torch.bfloat16)
        assert (found is not None and found[0] == "min_diagonal") == crossed
    m = torch.tensor([1.0, float("inf")])
    assert verdict(readings(m).tolist(), torch.float32)[0] == "nonfinite"
    assert verdict(readings(m[:1], failed=torch.tensor(True)).tolist(), torch.float32)[0] == (
        "failed"
    )


def test_widenings():
    assert widenings(torch.bfloat16) == [torch.bfloat16, torch.float32, torch.float64]
    assert widenings(torch.float64) == [torch.float64]
