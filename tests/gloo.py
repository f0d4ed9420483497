"""One way to run a test's ranks: real gloo processes on this machine's CPU.

`spawn` starts ``world`` processes (``torch.multiprocessing.spawn``); each joins a gloo
process group on 127.0.0.1, runs ``fn(rank, world, *args)`` with one thread, and leaves
with the others: a rank that destroys its process group while another still reads from
it aborts in gloo ("terminate called without an active exception"). ``fn`` must be a
module-level function (it is pickled); ranks hand results back through files.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], *args, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raise if any rank fails."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
    mp.spawn(_rank, args=(fn, world, _free_port(), args), nprocs=world, join=True)
