"""The first NaN/Inf is found at its origin, whatever the cadence; scaler skips are not events."""

import math

import pytest
import torch
from torch import nn

import probes
from singd import SINGD


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backward_value):
        ctx.backward_value = backward_value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.backward_value is None:
            return grad, None
        out = grad.clone()
        out.view(-1)[3] = ctx.backward_value
        return out, None


class Poison(nn.Module):
    """Identity that writes a value into its output (forward) or its input's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.forward_value: float | None = None
        self.backward_value: float | None = None

    def forward(self, x):
        y = _Poison.apply(x, self.backward_value)
        if self.forward_value is not None:
            y = y.clone()
            y.view(-1)[5] = self.forward_value
        return y


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), Poison(), nn.Tanh(), nn.Linear(8, 3))


def _train(model, optimizer, steps, arm, every=1000, **kwargs):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with probes.attach(model, optimizer, every=every, **kwargs) as session:
        for step in range(steps):
            arm(step)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return session


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_forward_injection_found_at_its_module(value):
    model = _model()

    def arm(step):
        model[1].forward_value = value if step == 7 else None

    session = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 10, arm)
    assert session.first_nonfinite() == probes.NonFinite(7, "1", "activation", "forward")
    summary = session.summary()
    assert summary["first_nonfinite_step"] == 7
    # Once a weight is NaN every later step holds one; an Inf also counts from step 7 on.
    if math.isnan(value):
        assert summary["nan_events"] == 3 and summary["inf_events"] == 0
    else:
        assert summary["inf_events"] >= 1


def test_backward_injection_found_in_the_upstream_output_gradient():
    model = _model()

    def arm(step):
        model[1].backward_value = math.nan if step == 4 else None

    session = _train(model, torch.optim.AdamW(model.parameters(), lr=0.01), 6, arm)
    # Poison's backward writes the gradient flowing into module 0's output.
    assert session.first_nonfinite() == probes.NonFinite(4, "0", "output_grad", "backward")
    origins = session.to_frame().query("metric == 'first_nonfinite'")
    assert ("0.weight", "grad", "backward") in set(
        zip(origins["module"], origins["tensor"], origins["phase"], strict=True)
    )
    assert (origins["value"] == origins["step"]).all()


def test_update_injection_found_in_the_step_phase():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def arm(step):
        optimizer.param_groups[0]["lr"] = math.nan if step == 3 else 0.01

    session = _train(model, optimizer, 5, arm)
    assert session.first_nonfinite() == probes.NonFinite(3, "0.weight", "update", "step")


def test_singd_factor_origin_and_clean_run():
    model = _model()
    optimizer = SINGD(model, lr=0.01, structures=("diagonal", "diagonal"), T=1)
    clean = _train(model, optimizer, 4, lambda step: None)
    assert clean.first_nonfinite() is None
    assert clean.summary()["nan_events"] == 0

    def arm(step):
        model[1].forward_value = math.nan if step == 2 else None

    session = _train(model, optimizer, 4, arm)
    assert session.first_nonfinite() == probes.NonFinite(2, "1", "activation", "forward")
    origins = session.to_frame().query("metric == 'first_nonfinite'")
    assert {"K", "C"} & set(origins["tensor"]), "the NaN reached SINGD's factors and was seen"


def test_allow_list_ignores_intentional_infinities_but_not_nans():
    model = _model()

    def arm(step):
        model[1].forward_value = -math.inf if step == 1 else None

    # -inf through tanh gives -1: no other tensor goes non-finite, the event is the mask.
    allowed = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 3, arm, allow_inf=r"^1$")
    assert allowed.first_nonfinite() is None and allowed.summary()["inf_events"] == 0
    model = _model()
    flagged = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 3, arm)
    assert flagged.first_nonfinite() == probes.NonFinite(1, "1", "activation", "forward")


@pytest.mark.parametrize("family", ["sgd", "singd"])
def test_gradscaler_skips_are_counted_apart(family):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if family == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        optimizer = SINGD(model, lr=0.01, structures=("diagonal", "diagonal"), T=1)
    # The first three scaled losses are infinite, so their gradients are not finite and
    # the scaler skips those steps (SGD: never calls step; SINGD: skips inside it).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with probes.attach(model, optimizer, every=1000) as session:
        for step in range(12):
            boost = math.inf if step < 3 else 1.0
            optimizer.zero_grad()
            scaler.scale(boost * nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
    summary = session.summary()
    assert scaler.get_scale() == 2.0**13
    assert summary["skipped_steps"] == 3
    assert summary["nan_events"] == 0 and summary["inf_events"] == 0
    assert session.first_nonfinite() is None
    assert summary["steps"] == 12
    skipped_rows = session.to_frame().query("metric == 'skipped_step'")
    assert len(skipped_rows) == summary["skipped_steps"]


def test_loop_that_stops_on_a_nonfinite_loss_still_records_the_origin():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with probes.attach(model, optimizer, every=1000) as session:
        for step in range(5):
            model[1].forward_value = math.inf if step == 3 else None
            loss = nn.functional.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                break  # as the stress runner does: no backward, no step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert session.first_nonfinite() == probes.NonFinite(3, "1", "activation", "forward")
    assert session.summary()["inf_events"] == 1 and session.summary()["skipped_steps"] == 0


def test_parameter_sum_overflow_is_a_false_alarm_read_again_exactly():
    """The hot path checks parameters by sums; a sum of finite float16 values can overflow
    (here 4096 x 60000 > 65504) and must then be read exactly, counting no event."""
    model = nn.Sequential(nn.Linear(64, 64)).half()
    with torch.no_grad():
        model[0].weight.fill_(60000.0)  # finite, past float16's overflow-risk threshold
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert not torch.isfinite(model[0].weight.sum()), "the premise: the sum overflows"
    x = torch.zeros(4, 64, dtype=torch.float16)
    with probes.attach(model, optimizer, every=1000) as session:
        for _ in range(3):
            optimizer.zero_grad()
            model(x).float().sum().backward()
            optimizer.step()
    summary = session.summary()
    assert session.first_nonfinite() is None
    assert summary["nan_events"] == summary["inf_events"] == 0
    assert summary["overflow_events"] == 3  # the exact readings saw the risk, every step


def test_parameter_made_nonfinite_by_the_step_is_found_when_nothing_else_is_read():
    """With every reading of the forward and backward clean, the sums alone must send the
    iteration to the exact path: a NaN learning rate poisons only the update."""
    model = nn.Sequential(nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with probes.attach(model, optimizer, every=1000) as session:
        for step in range(4):
            optimizer.param_groups[0]["lr"] = math.nan if step == 2 else 0.1
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert session.first_nonfinite() == probes.NonFinite(2, "0.weight", "update", "step")
    assert session.summary()["nan_events"] == 2  # steps 2 and 3: the NaN stays
