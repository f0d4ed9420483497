"""A GradScaler whose scale collapsed to 0 (issue 14, item 8): the step is skipped and counted.

After many non-finite steps a GradScaler's scale can reach 0 (each one multiplies it by
``backoff_factor``; float32 underflows). Then the loss and every gradient are 0, the
scaler's inf check (on gradients not yet un-scaled) passes, and the optimizer receives a
scale of 0: SINGD and KFAC divided by it (ZeroDivisionError). (torch's AdamW carries on:
the scaler un-scales its zero gradients by 1/0 into NaN after checking them, on the CPU
with torch 2.13, and its parameters turn NaN.) Ours skip the step, as for infs, and
count it in ``skipped_steps``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.optimizers import factory

OPTIMIZERS = {
    "singd:dense": factory("singd:dense", lr=0.1, lr_cov=0.1, T=1, init_grad_scale=4.0),
    "singd:diagonal": factory("singd:diagonal", lr=0.1, lr_cov=0.1, T=1, init_grad_scale=4.0),
    "kfac": factory("kfac", lr=0.1, damping=1e-2, T=1, init_grad_scale=4.0),
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(poison: bool = False):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    if poison:
        x[0, 0] = float("inf")
    return x, torch.randint(0, 3, (16,), generator=generator)


def scaled_step(model, optimizer, scaler, x, y) -> None:
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore:Gradients hold infs")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_collapsed_scale_skips_steps_and_counts_them(name):
    model = mlp()
    optimizer = OPTIMIZERS[name](model)
    # backoff_factor 0: one non-finite step takes the scale to 0, as many would.
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, backoff_factor=0.0)
    scaled_step(model, optimizer, scaler, *batch())
    scaled_step(model, optimizer, scaler, *batch(poison=True))
    assert scaler.get_scale() == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="gradient scale is 0"):
        for _ in range(3):
            scaled_step(model, optimizer, scaler, *batch())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    for view in optimizer.curvature_state():
        assert view.counters["skipped_steps"] == 1 + 3
        assert all(torch.isfinite(f).all() for f in _tensors(view.factors))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_scale_set_to_zero_by_hand_skips_the_step(name):
    model = mlp()
    optimizer = OPTIMIZERS[name](model)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.set_current_grad_scale(0.0)
    with pytest.warns(UserWarning, match="gradient scale is 0"):
        optimizer.step()
    assert all(v.counters["skipped_steps"] == 1 for v in optimizer.curvature_state())


def _tensors(factors):
    for value in factors.values():
        if isinstance(value, torch.Tensor):
            yield value
        else:
            yield from value.tensors().values()
