"""``torchrun ... precision_lab stress --fsdp``: every run sharded with FSDP2, per-rank memory.

The same quick runs with DDP and with ``--fsdp`` on two CPU ranks: both finish, and under
FSDP each rank's recorded optimizer state is about half of DDP's (the momenta and AdamW's
moments are sharded, each layer's factors held by one rank).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from precision_lab import load_run


def _stress(out, *extra: str):
    command = [
        *("torchrun", "--nproc-per-node", "2", "-m", "precision_lab", "stress"),
        *("--dtype", "bf16", "--suite", "quick", "--scenarios", "baseline"),
        *("--optimizers", "singd:diagonal,kfac:cholesky,adamw", "--steps", "3"),
        *("--out", str(out), *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return load_run(out)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_fsdp_runs_finish_and_hold_a_share_of_the_state(tmp_path):
    fsdp, records = _stress(tmp_path / "fsdp", "--fsdp")
    ddp, _ = _stress(tmp_path / "ddp")
    assert len(fsdp) == 6 and fsdp["finished"].all()
    assert sorted(records["rank"].unique()) == [0, 1]
    sharded = fsdp.set_index("run")["optimizer_state_bytes"]
    whole = ddp.set_index("run")["optimizer_state_bytes"]
    ratio = sharded / whole
    assert ((ratio > 0.3) & (ratio < 0.7)).all(), ratio
