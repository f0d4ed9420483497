"""SINGD and KFAC steps never wait for the device: no host read beyond SGD's (issue 18).

On a GPU, every host read (``item()``, ``bool()``, ``tolist()``, a copy to the CPU) waits
until every queued kernel has run. Counted here on the CPU, where the count is the same
(`tests.host_reads.HostReads`), over 10 update steps (T=1) of a two-layer MLP: SGD with
momentum makes none, and one per step under a GradScaler (its ``found_inf``). SINGD
made four per layer and update (its trace coefficients) and KFAC three per inversion.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.host_reads import HostReads
from tests.training import finish_step

STRUCTURES = ("diagonal", "dense", "hierarchical3_3", "block4diagonal", "triltoeplitz")
OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    **{f"singd:{s}": partial(SINGD, T=1, structures=(s, s)) for s in STRUCTURES},
    "singd:dense/diagonal": partial(SINGD, T=1, structures=("dense", "diagonal")),
    "singd:normalize_lr_cov": partial(SINGD, T=1, normalize_lr_cov=True),
    "ikfac": partial(SINGD, T=1, kfac_like=True),
    "singd:accumulation": partial(SINGD, T=1, structures=("diagonal", "diagonal")),
    **{f"kfac:{m}": partial(KFAC, T=1, inverse_method=m) for m in ("cholesky", "eigh", "inv")},
}


def host_reads(name: str, scaler: bool, device: str = "cpu", steps: int = 10) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    optimizer = OPTIMIZERS[name](model)
    x = torch.randn(32, 8, device=device)
    y = torch.randint(4, (32,), device=device)
    grad_scaler = torch.amp.GradScaler(device, init_scale=2.0**4) if scaler else None
    passes = 2 if name.endswith("accumulation") else 1

    def step() -> None:
        for _ in range(passes):
            loss = nn.functional.cross_entropy(model(x), y) / passes
            (grad_scaler.scale(loss) if scaler else loss).backward()
        finish_step(optimizer, grad_scaler)
        optimizer.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # the first step: scaler and optimizer state are made
        with HostReads() as reads:
            for _ in range(steps):
                step()
    return reads.kinds


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "sgd"])
def test_a_step_reads_no_more_than_sgd(name, scaler):
    baseline = sum(host_reads("sgd", scaler).values())
    assert baseline == (10 if scaler else 0)  # GradScaler's found_inf, once a step
    assert sum(host_reads(name, scaler).values()) == baseline, host_reads(name, scaler)


def test_kfac_failures_are_counted_on_the_device_and_read_on_request():
    """A failed inversion (a NaN factor) keeps the previous inverse without a host read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = KFAC(model, T=1, damping=1e-2)
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    kept = optimizer._factors["0"]["A_inv"].clone()
    optimizer.zero_grad()
    x = x.clone()
    x[0, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with HostReads() as reads:
        optimizer.step()
    assert reads.count == 0
    assert torch.equal(optimizer._factors["0"]["A_inv"], kept)
    assert optimizer.failed_decompositions == 2  # A and G
    assert optimizer.curvature_state()[0].counters["failed_decompositions"] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("name", ["singd:diagonal", "singd:dense", "kfac:cholesky", "kfac:inv"])
def test_on_cuda_a_step_reads_no_more_than_sgd(name, scaler):
    """Also counts device-to-host copies made inside torch (LAPACK error checks)."""
    baseline = sum(host_reads("sgd", scaler, "cuda").values())
    assert sum(host_reads(name, scaler, "cuda").values()) == baseline
