"""Two real gloo processes: every row carries its rank and rank 0 gathers them all."""

import torch
from torch import nn

import probes
from probes.records import read_parquet
from singd import SINGD
from tests.gloo import spawn


def _worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = SINGD(model, lr=0.01, T=1, structures=("diagonal", "diagonal"))
    torch.manual_seed(1 + rank)
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    with probes.attach(model, optimizer, every=2, run="ddp") as session:
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert session.rank == rank
    gathered = session.gather(dst=0)
    if rank == 0:
        probes.records.write_parquet(gathered, out)
    else:
        assert gathered is None


def test_gather_to_rank_zero_over_two_gloo_processes(tmp_path):
    out = tmp_path / "gathered.parquet"
    spawn(_worker, str(out))
    frame = read_parquet(out)
    assert set(frame["rank"]) == {0, 1}
    per_rank = frame.groupby("rank").size()
    assert per_rank[0] == per_rank[1] > 0
    assert (frame["run"] == "ddp").all()
    # The ranks saw different data, so their activation statistics differ.
    act = frame.query("tensor == 'activation' and metric == 'amax' and step == 0")
    assert act.groupby("rank")["value"].sum().nunique() == 2
