"""`KroneckerOptimizer`'s own behaviour, once over every Kronecker optimizer (`KRONECKER`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tests.optimizers import KRONECKER, factory


def _trained(spec: str, steps: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = factory(spec, lr=0.05, T=1)(model)
    x, y = torch.randn(16, 33), torch.randint(0, 3, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer, (x, y)


@pytest.mark.parametrize("spec", KRONECKER)
def test_state_bytes_count_every_state_tensor_once(spec):
    _, optimizer, _ = _trained(spec)
    categories = optimizer.state_bytes()
    assert {"accumulators", "param_buffers", "fallback"} <= set(categories)
    factors = sum(
        t.numel() * t.element_size()
        for state in optimizer._factors.values()
        for value in state.values()
        for t in ([value] if isinstance(value, torch.Tensor) else value.tensors().values())
    )
    buffers = sum(s["momentum_buffer"].nbytes for s in optimizer.state.values())
    fallback = sum(t.nbytes for s in optimizer.fallback.state.values() for t in s.values())
    assert categories["param_buffers"] == buffers > 0
    assert categories["fallback"] == fallback > 0  # the LayerNorm's AdamW state
    assert sum(categories.values()) - buffers - fallback == factors


@pytest.mark.parametrize("spec", KRONECKER)
def test_a_step_with_infs_changes_nothing_and_is_counted(spec):
    model, optimizer, (x, y) = _trained(spec)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.found_inf = torch.tensor(1.0)  # as torch.amp.GradScaler hands it over
    with pytest.warns(UserWarning, match="skipping this step"):
        optimizer.step()
    del optimizer.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {layer.counters["skipped_steps"] for layer in optimizer.curvature_state()} == {1}


@pytest.mark.parametrize("spec", KRONECKER)
def test_removed_hooks_collect_nothing_and_removing_twice_is_harmless(spec):
    model, optimizer, (x, y) = _trained(spec)
    optimizer.remove_hooks()
    optimizer.remove_hooks()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(not state.keys() & optimizer.ACCUMULATORS for state in optimizer._factors.values())


@pytest.mark.parametrize("spec", KRONECKER)
def test_layers_are_hooked_only_for_the_steps_that_collect_curvature(spec):
    """With T=3 the Linear layers carry the optimizer's forward hook for steps 0, 3, 6
    only (attached at the end of the step before), after loading a checkpoint as its step
    says, and never after `remove_hooks`."""
    model, optimizer, (x, y) = _trained(spec, steps=0)
    optimizer.param_groups[0]["T"] = 3
    other_model, other, _ = _trained(spec, steps=1)
    other.param_groups[0]["T"] = 3
    other.step()  # steps 0 and 1 taken: step 2 collects nothing
    assert not other_model[0]._forward_hooks
    hooked, other_hooked = [], []
    for _ in range(6):
        hooked.append([len(m._forward_hooks) for m in (model[0], model[3])])
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert hooked == [[1, 1], [0, 0], [0, 0], [1, 1], [0, 0], [0, 0]]
    assert all(not state.keys() & optimizer.ACCUMULATORS for state in optimizer._factors.values())
    at_two = other.state_dict()
    other.load_state_dict(optimizer.state_dict())  # at step 6: hooked
    other_hooked.append([len(m._forward_hooks) for m in (other_model[0], other_model[3])])
    other.load_state_dict(at_two)  # at step 2 again: not hooked
    other_hooked.append([len(m._forward_hooks) for m in (other_model[0], other_model[3])])
    optimizer.remove_hooks()
    optimizer.step()
    assert other_hooked == [[1, 1], [0, 0]]
    assert not any(m._forward_hooks for m in model.modules())


def _scaled_step(spec: str, unscale: bool, tell: bool):
    """One step through a GradScaler (scale 2^10), after ``unscale_`` or not, telling the
    optimizer the scale after ``unscale_`` or not; the parameters after it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 8), nn.Tanh(), nn.Linear(8, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = factory(spec, lr=0.05, T=1, init_grad_scale=2.0**10)(model)
    x, y = torch.randn(16, 33), torch.randint(0, 3, (16,))
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if unscale:
        scaler.unscale_(optimizer)
        if tell:
            optimizer.set_current_grad_scale(scaler.get_scale())
    scaler.step(optimizer)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("spec", KRONECKER)
def test_grad_scaler_unscale_before_step_needs_the_scale(spec):
    """``scaler.unscale_`` before ``scaler.step`` (PyTorch's clipping recipe) hands the
    optimizer no scale: the curvature terms, made from scaled output gradients, would be
    un-scaled by 1 (a SINGD dense layer's parameters went to inf in three steps). Told
    the scale, the step is the one ``scaler.step`` alone takes; not told, a ValueError
    before anything changes."""
    plain = _scaled_step(spec, unscale=False, tell=False)
    told = _scaled_step(spec, unscale=True, tell=True)
    for a, b in zip(told, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"set_current_grad_scale\(scaler.get_scale\(\)\)"):
        _scaled_step(spec, unscale=True, tell=False)
