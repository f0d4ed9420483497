"""Probes on an FSDP2-sharded model: each rank reads its own shards, rows gather to rank 0.

Two real gloo ranks train a sharded MLP with SINGD under `probes.attach`; rank 0 gathers
every rank's rows. A weight's ``amax`` row on a rank is that rank's shard's (the two
shards of a weight differ, so a row of the whole weight would show on both ranks); the
momentum's bytes are this rank's shard's; the curvature probes read the factors, which
every rank holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import probes
from singd import SINGD
from tests.gloo import spawn

STEPS = 3


def _worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = SINGD(model, lr=0.1, structures=("dense", "dense"))
    generator = torch.Generator().manual_seed(rank)
    with probes.attach(model, optimizer, rank=rank, every=1) as session:
        for _ in range(STEPS):
            model(torch.randn(4, 8, generator=generator)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    frame = session.gather()
    weight = model[0].weight.to_local().detach().abs().amax().item()
    amaxes = [None] * world
    dist.all_gather_object(amaxes, weight)
    if rank == 0:
        frame.to_pickle(Path(out) / "rows.pkl")
        torch.save({"amax": amaxes}, Path(out) / "shards.pt")


@pytest.mark.slow
def test_probes_read_each_ranks_shards(tmp_path):
    spawn(_worker, str(tmp_path))
    import pandas as pd

    rows = pd.read_pickle(tmp_path / "rows.pkl")
    amax = torch.load(tmp_path / "shards.pt", weights_only=True)["amax"]
    assert amax[0] != amax[1]
    weight = rows[
        (rows["probe"] == "numerics")
        & (rows["module"] == "0.weight")
        & (rows["tensor"] == "weight")
        & (rows["metric"] == "amax")
    ]
    assert set(weight["rank"]) == {0, 1}
    for rank in (0, 1):
        last = weight[weight["rank"] == rank].sort_values("step")["value"].iloc[-1]
        # The weight read before the last step's update: the shard's amax moves little.
        assert abs(last - amax[rank]) < abs(amax[0] - amax[1]), (rank, last, amax)
    condition = rows[(rows["probe"] == "condition") & (rows["metric"] == "condition_number")]
    assert set(condition["rank"]) == {0, 1} and condition["value"].notna().all()
