"""``all_reduce`` over two real gloo processes on the CPU, for every structure and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from singd.structures import STRUCTURE_NAMES
from tests.gloo import spawn
from tests.singd.structures.cases import DTYPES, random_structured

WORLD = 2
DIM = 31


def _check_rank(rank: int, world: int) -> None:
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


@pytest.mark.slow
def test_all_reduce_sums_and_averages_every_stored_tensor():
    spawn(_check_rank, world=WORLD)
