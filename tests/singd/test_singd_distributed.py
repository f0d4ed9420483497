"""Two real gloo processes with a GradScaler, where only one rank sees an inf.

Without the wrapper each rank's scaler judges only its own gradients; SINGD must make
the ranks agree on skipping (otherwise one rank all-reduces while the other does not,
and they hang). Both ranks must skip the step, keep identical parameters and factors,
and train on afterwards.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from singd import SINGD
from tests.gloo import spawn


def _worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, init_grad_scale=2.0**6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    generator = torch.Generator().manual_seed(rank)
    snapshots = []
    for step in range(3):
        x = torch.randn(5, 4, generator=generator)
        if step == 1 and rank == 0:
            x[0, 0] = float("inf")
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(optimizer)
        scaler.update()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    views = optimizer.curvature_state()
    torch.save(
        {
            "snapshots": snapshots,
            "skipped": [v.counters["skipped_steps"] for v in views],
            "K": [v.factors["K"].to_dense() for v in views],
        },
        f"{out}/rank{rank}.pt",
    )


def test_ranks_agree_on_skipping_a_step_with_infs(tmp_path):
    spawn(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["skipped"] == [1, 1]
        for before, after in zip(rank["snapshots"][0], rank["snapshots"][1], strict=True):
            assert torch.equal(before, after)  # step 1 skipped
        for before, after in zip(rank["snapshots"][1], rank["snapshots"][2], strict=True):
            assert not torch.equal(before, after)  # step 2 trained
    for a, b in zip(ranks[0]["snapshots"][-1], ranks[1]["snapshots"][-1], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["K"], ranks[1]["K"], strict=True):
        assert torch.equal(a, b)
