"""Steps taken under a Python dispatch mode (torch's FlopCounterMode, memory trackers,
`probes.tensor_memory.TensorPeak`) give bit for bit the results of steps taken without.

Under such a mode torch's in-place foreach operations do not bump version counters, which
the optimizers' caches read (SINGD's diagonal squares, hierarchical factors' dense rows):
these tests failed when the caches trusted the counters alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from singd import KFAC, SINGD

STRUCTURES = ["diagonal", "hierarchical3_3", "dense", "triltoeplitz"]


def _train(make, modes: set[int], steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(4, (8,))
    optimizer = make(model)
    for step in range(steps):
        mode = FlopCounterMode(display=False) if step in modes else None
        if mode is not None:
            mode.__enter__()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if mode is not None:
            mode.__exit__(None, None, None)
    state = [
        t.clone()
        for layer in optimizer.curvature_state()
        for factor in layer.factors.values()
        for t in (factor.tensors().values() if hasattr(factor, "tensors") else [factor])
    ]
    return [p.detach().clone() for p in model.parameters()] + state


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_singd_steps_under_a_dispatch_mode_are_bitwise_the_same(structure, T):
    def make(model):
        return SINGD(model, structures=(structure, structure), T=T, lr_cov=1e-1)

    plain = _train(make, set())
    for modes in ({0}, {0, 1, 2}, {1, 3}):
        under = _train(make, modes)
        assert all(torch.equal(a, b) for a, b in zip(plain, under, strict=True)), modes


def test_kfac_steps_under_a_dispatch_mode_are_bitwise_the_same():
    plain = _train(lambda m: KFAC(m, T=1), set())
    under = _train(lambda m: KFAC(m, T=1), {0, 2})
    assert all(torch.equal(a, b) for a, b in zip(plain, under, strict=True))
