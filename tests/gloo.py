"""One way to run a test's ranks: real gloo processes on this machine's CPU.

`spawn` starts ``world`` processes (``torch.multiprocessing.spawn``); each joins a gloo
process group on 127.0.0.1, runs ``fn(rank, world, *args)`` with one thread, and leaves
with the others: a rank that destroys its process group while another still reads from
it aborts in gloo ("terminate called without an active exception"). Even after a
barrier, gloo's teardown still aborts now and then (once in a clean-clone CI run here):
a rank that has finished ``fn`` and the barrier leaves a mark, and an abort (SIGABRT)
of a rank that left its mark is gloo's teardown, not the test's result, so it is not
raised. ``fn`` must be a module-level function (it is pickled); ranks hand results
back through files.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, fn: Callable, world: int, port: int, marks: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
        (Path(marks) / str(rank)).touch()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], *args, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raise if any rank fails."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
    with tempfile.TemporaryDirectory() as marks:
        try:
            mp.spawn(_rank, args=(fn, world, _free_port(), marks, args), nprocs=world, join=True)
        except mp.ProcessExitedException as error:
            finished = (Path(marks) / str(error.error_index)).exists()
            if not (finished and error.signal_name == "SIGABRT"):
                raise
