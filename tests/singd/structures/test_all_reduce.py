"""``all_reduce`` over two real gloo processes on the CPU, for every structure and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from singd.structures import STRUCTURE_NAMES
from tests.singd.structures.cases import DTYPES, random_structured

WORLD = 2
DIM = 31


def _check_rank(rank: int, store_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        for name in STRUCTURE_NAMES:
            for dtype in DTYPES:
                mine, _ = random_structured(name, DIM, dtype, seed=100 + rank)
                first, _ = random_structured(name, DIM, dtype, seed=100)
                second, _ = random_structured(name, DIM, dtype, seed=101)
                total = first.clone().add_(second)
                summed = mine.clone().all_reduce(op=dist.ReduceOp.SUM)
                assert torch.equal(summed.to_dense(), total.to_dense()), (name, dtype, "SUM")
                # AVG, which gloo lacks: a sum halved, exactly (a power of two).
                averaged = mine.clone().all_reduce()
                halved = total.mul_(1 / WORLD)
                assert torch.equal(averaged.to_dense(), halved.to_dense()), (name, dtype, "AVG")
                assert averaged.dtype == dtype
        # Leave together: a rank that destroys its process group while the other still
        # reads from it aborts in gloo ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_and_averages_every_stored_tensor(tmp_path):
    mp.spawn(_check_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
