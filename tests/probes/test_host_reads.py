"""Probes that never wait for the device (issue 18): readings stay on the device between
cadences, and are read at the cadence, at detach or when asked, with the same answers.

Read every step, the probes also read the gradients, factors and momenta of a step whose
parameters turned non-finite, to trace a value born in the optimizer step; deferred,
they report it at the parameter's ``update``: the comparison below leaves those out.
Host reads are counted on the CPU (`tests.host_reads.HostReads`), with
``read_every_step=False``, the default on a GPU: the count is the same on every device.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import probes
from singd import SINGD
from tests.host_reads import HostReads
from tests.optimizers import factory
from tests.probes.test_first_nonfinite import Poison
from tests.training import finish_step

OPTIMIZERS = {
    "sgd": factory("sgd", lr=0.1, momentum=0.9),
    "adamw": factory("adamw", lr=0.01),
    "singd:diagonal": factory("singd:diagonal", T=1),
    "singd:dense": factory("singd:dense", T=1),
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), Poison(), nn.Tanh(), nn.Linear(8, 3))


def _train_step(model, optimizer, x, y, grad_scaler) -> None:
    """One step of cross-entropy training, through ``grad_scaler`` where given."""
    loss = nn.functional.cross_entropy(model(x), y)
    (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
    finish_step(optimizer, grad_scaler)


def _reads(name: str, probed: bool, scaler: bool) -> int:
    model = _model()
    optimizer = OPTIMIZERS[name](model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaler else None

    def step() -> None:
        _train_step(model, optimizer, x, y, grad_scaler)
        optimizer.zero_grad()

    session = probes.attach(model, optimizer, read_every_step=False) if probed else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # step 0 is a cadence (every reading at once); state is made
            step()
        with HostReads() as reads:
            for _ in range(20):  # steady state: no cadence due (defaults: 1000)
                step()
    if session is not None:
        assert session.summary()["steps"] == 23
        session.detach()
    return reads.count


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_probed_loop_reads_no_more_than_the_bare_loop(name, scaler):
    bare = _reads(name, probed=False, scaler=scaler)
    assert _reads(name, probed=True, scaler=scaler) == bare


def _run(read_every_step: bool, arm, steps: int = 8, scaler: bool = False):
    model = _model()
    optimizer = SINGD(model, T=1, lr=0.05, structures=("diagonal", "diagonal"))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaler else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = probes.attach(model, optimizer, every=5, read_every_step=read_every_step)
        for step in range(steps):
            arm(model[1], step)
            optimizer.zero_grad()
            _train_step(model, optimizer, x, y, grad_scaler)
        first = session.first_nonfinite()
        session.detach()
    frame = session.to_frame()
    numerics = frame[
        (frame["probe"] == "numerics")
        & frame["metric"].isin(["first_nonfinite", "skipped_step"])
        & frame["tensor"].isin(["activation", "output_grad", "update", ""])
    ]
    rows = sorted(map(tuple, numerics[["step", "module", "tensor", "phase", "metric"]].values))
    summary = session.summary()
    keys = ("steps", "skipped_steps", "first_nonfinite_step", "nan_events", "inf_events")
    return first, rows, {key: summary[key] for key in keys}


def _forward_nan_at(step: int):
    def arm(poison, s):
        poison.forward_value = math.nan if s == step else None

    return arm


def _backward_inf_at(step: int):
    def arm(poison, s):
        poison.backward_value = math.inf if s >= step else None

    return arm


@pytest.mark.parametrize(
    "arm, scaler",
    [
        (_forward_nan_at(2), False),  # between cadences (every=5)
        (_forward_nan_at(5), False),  # at a cadence
        (_backward_inf_at(3), False),
        (_backward_inf_at(6), True),  # GradScaler skips: no event, skipped steps counted
        (lambda poison, s: None, False),  # a clean run
    ],
    ids=["forward-nan-between", "forward-nan-at-cadence", "backward-inf", "scaler-skips", "clean"],
)
def test_deferred_readings_give_the_answers_of_reading_every_step(arm, scaler):
    deferred = _run(False, arm, scaler=scaler)
    assert deferred == _run(True, arm, scaler=scaler)
    if scaler:
        assert deferred[2]["skipped_steps"] > 0


def test_first_nonfinite_reads_what_waits():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with probes.attach(model, optimizer, read_every_step=False) as session:
        for step in range(4):
            model[1].forward_value = math.nan if step == 2 else None
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            with HostReads() as reads:
                first = session.first_nonfinite()
            assert reads.count >= (1 if step else 0)
            if step < 2:
                assert first is None
        assert first == probes.NonFinite(2, "1", "activation", "forward")
