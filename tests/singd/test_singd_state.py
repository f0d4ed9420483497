"""SINGD's state: checkpoints that load with weights_only and resume exactly, the
memory accounting, and the read-only curvature view."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.structures import STRUCTURE_NAMES, get_structure


def model_with_norm() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 5, generator=generator), torch.randint(0, 3, (12,), generator=generator)


def lr_cov_schedule(step: int) -> float:
    return 0.05 * min(1.0, (step + 1) / 4)


def build(structures=("dense", "hierarchical2_3")):
    model = model_with_norm()
    optimizer = SINGD(
        model,
        lr=0.05,
        T=3,
        lr_cov=lr_cov_schedule,
        structures=structures,
        init_grad_scale=2.0**4,
        weight_decay=0.01,
    )
    # The scale grows every 2 steps, so resuming must restore the scale bookkeeping too.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
    return model, optimizer, scaler


def train(model, optimizer, scaler, steps):
    for step in steps:
        X, y = batch(step)
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_from_a_weights_only_checkpoint_is_bitwise_exact(tmp_path, stop):
    model, optimizer, scaler = build()
    train(model, optimizer, scaler, range(8))

    first = build()
    train(*first, range(stop))
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": first[0].state_dict(),
            "optimizer": first[1].state_dict(),
            "scaler": first[2].state_dict(),
        },
        path,
    )
    del first
    checkpoint = torch.load(path, weights_only=True)
    resumed_model, resumed_optimizer, resumed_scaler = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scaler.load_state_dict(checkpoint["scaler"])
    assert resumed_optimizer.param_groups[0]["lr_cov"] is lr_cov_schedule
    train(resumed_model, resumed_optimizer, resumed_scaler, range(stop, 8))

    for name, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name
    for ours, theirs in zip(
        optimizer.curvature_state(), resumed_optimizer.curvature_state(), strict=True
    ):
        for key, factor in ours.factors.items():
            assert torch.equal(theirs.factors[key].to_dense(), factor.to_dense()), key


def test_resume_keeps_layers_moved_to_the_fallback(tmp_path):
    """Layers moved at the first step (forward never ran) stay moved after loading."""

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x) @ self.unused.weight  # uses the weight, never the forward

    def run(steps, optimizer=None, model=None):
        for step in steps:
            x = batch(step)[0][:, :4]
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    torch.manual_seed(0)
    model = Owner()
    with pytest.warns(UserWarning, match="never ran"):
        optimizer = SINGD(model, T=1)
        run(range(2), optimizer, model)
    state = copy.deepcopy(optimizer.state_dict())  # state_dict() holds live tensors
    assert state["kronecker"]["fallback_layers"] == ["unused"]
    torch.manual_seed(0)
    fresh_model = Owner()
    fresh_model.load_state_dict(model.state_dict())
    fresh = SINGD(fresh_model, T=1)
    fresh.load_state_dict(state)
    run(range(2, 4), optimizer, model)
    run(range(2, 4), fresh, fresh_model)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_schedule_must_be_passed_again():
    model, optimizer, scaler = build()
    train(model, optimizer, scaler, range(1))
    state = optimizer.state_dict()
    assert state["param_groups"][0]["lr_cov"] is None
    other = SINGD(model_with_norm(), T=3, structures=("dense", "hierarchical2_3"))
    with pytest.raises(ValueError, match="schedule"):
        other.load_state_dict(state)


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("alpha1", [0.5, 0.0])
def test_state_bytes_are_the_structures_storage(structure, alpha1):
    """No hidden dense copy: the state is exactly the stored entries plus momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 50), nn.ReLU(), nn.Linear(50, 7, bias=False))
    optimizer = SINGD(model, structures=(structure, structure), alpha1=alpha1, T=1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 37)).square().mean().backward()
        optimizer.step()
    cls = get_structure(structure)
    dims = [38, 50, 50, 7]  # (d_K, d_C) per layer
    expected = sum(cls.storage_entries(d) for d in dims) * 4
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert optimizer.state_bytes() == {
        "factors": expected,
        "momenta": expected if alpha1 else 0,
        "accumulators": 0,
        "param_buffers": weights,
        "fallback": 0,
    }
    stored = sum(f.nbytes for view in optimizer.curvature_state() for f in view.factors.values())
    assert stored == expected * (2 if alpha1 else 1)
    if structure != "dense":
        assert expected < sum(d * d for d in dims) * 4


@pytest.mark.parametrize("structures", [("hierarchical2_2", "triltoeplitz"), ("diagonal",) * 2])
def test_curvature_view_preconditions_like_the_dense_formula(structures):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Conv2d(1, 2, 2))
    optimizer = SINGD(model, structures=structures, T=1, lr_cov=0.2)

    def loss():
        return model[:2](torch.randn(4, 6)).square().sum() + model[2](torch.randn(2, 1, 3, 3)).sum()

    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    optimizer.zero_grad()
    loss().backward()
    views = optimizer.curvature_state()
    assert [v.name for v in views] == ["0", "2"]
    assert views[1].param_names == ("2.weight", "2.bias")
    for view in views:
        K = view.factors["K"].to_dense().double()
        C = view.factors["C"].to_dense().double()
        assert not torch.allclose(K, torch.eye(len(K), dtype=K.dtype))
        G = view.gradient.double()
        module = dict(model.named_modules())[view.name]
        expected_grad = torch.cat([module.weight.grad.flatten(1), module.bias.grad[:, None]], 1)
        assert torch.equal(view.gradient, expected_grad)
        result = view.precondition(G)
        assert torch.equal(G, view.gradient.double())  # the argument is left alone
        assert result.dtype == torch.float64
        torch.testing.assert_close(result, C @ C.T @ G @ K @ K.T, rtol=1e-12, atol=1e-14)
        assert view.damping == {"K": 0.001, "C": 0.001}
        assert view.counters == {"skipped_steps": 0, "failed_decompositions": 0}


def test_a_checkpoint_of_another_model_is_refused():
    model, optimizer, scaler = build()
    train(model, optimizer, scaler, range(1))
    other = SINGD(nn.Sequential(nn.Linear(5, 3)), T=3, lr_cov=lr_cov_schedule)
    with pytest.raises(ValueError, match="built on the same model"):
        other.load_state_dict(optimizer.state_dict())
