"""Data-parallel training over two real gloo processes equals one process on the whole batch.

`torch.multiprocessing.spawn` starts two CPU processes that join a gloo process group on
127.0.0.1. Each trains a copy of the same model on its half of every batch, (a) with the
bare model (the optimizer all-reduces curvature terms and natural gradients itself, as
the published SINGD does) and (b) inside `DistributedDataParallel` (which the published
SINGD refuses), for a mean loss (`loss_average="batch"`) and a summed loss (`None`), in
float32 and float64. The parent process trains the same model on the whole batches and
checks, for every case:

- the ranks agree bit for bit (both apply the same all-reduced update);
- the update equals the single process's:
  `||(p_dist - p_0) - (p_single - p_0)|| / ||p_single - p_0||` at most 1e-5 in float32
  and 1e-10 in float64 (the two differ only in the order of floating-point sums).

The model has a LayerNorm, so the fallback optimizer's gradient reduction is covered too.

Other optimizers join by adding a factory to `OPTIMIZER_FACTORIES`: a picklable callable
`model -> optimizer` given the (possibly DDP-wrapped) model and the loss's
`loss_average`, e.g. `partial(KFAC, lr=...)`. The two processes are spawned once (a few
seconds) and run every optimizer on every case.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.gloo import spawn
from tests.optimizers import factory

WORLD = 2
STEPS = 3
BATCH = 8  # per step, over both ranks: each rank gets BATCH // WORLD rows
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
CASES = list(itertools.product(("bare", "ddp"), ("batch", None), (torch.float32, torch.float64)))

#: name -> picklable `factory(model, *, loss_average) -> torch.optim.Optimizer`.
OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "singd:hierarchical15_15/dense": factory(
        "singd:hierarchical15_15/dense", lr=0.05, lr_cov=0.05, T=1
    ),
    "kfac:cholesky": factory("kfac:cholesky", lr=0.05, damping=1e-2, T=1),
}


def build_model(dtype: torch.dtype) -> nn.Module:
    """A small MLP, input width > 30 so that hierarchical15_15 has its full shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5))
    return model.to(dtype)


def make_batches(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, BATCH, 33, generator=generator, dtype=dtype)
    targets = torch.randint(5, (STEPS, BATCH), generator=generator)
    return inputs, targets


def train(factory, mode: str, loss_average: str | None, dtype: torch.dtype, rank: int, world: int):
    """Train on this rank's share of every batch; returns the parameters after the last step."""
    model = build_model(dtype)
    reduction = "mean" if loss_average == "batch" else "sum"
    wrapped = DistributedDataParallel(model) if mode == "ddp" else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorm goes to the fallback
        optimizer = factory(wrapped, loss_average=loss_average)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for x, y in zip(*make_batches(dtype), strict=True):
        loss = nn.functional.cross_entropy(wrapped(x[rows]), y[rows], reduction=reduction)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, world: int, out: str) -> None:
    results = {
        (name, case): train(factory, *case, rank, world)
        for name, factory in OPTIMIZER_FACTORIES.items()
        for case in CASES
    }
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn the two ranks once for every optimizer and case; return each rank's results."""
    out = tmp_path_factory.mktemp("ranks")
    spawn(_worker, str(out), world=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(OPTIMIZER_FACTORIES))
@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{a or 'sum'}-{str(d)[6:]}" for m, a, d in CASES])
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, name, case):
    mode, loss_average, dtype = case
    distributed = ranks[0][name, case]
    for param, value in distributed.items():
        assert torch.equal(value, ranks[1][name, case][param]), f"ranks disagree on {param}"

    torch.set_num_threads(1)
    single = train(OPTIMIZER_FACTORIES[name], "bare", loss_average, dtype, rank=0, world=1)
    initial = {n: p.detach() for n, p in build_model(dtype).named_parameters()}
    diff = sum(float((distributed[n] - single[n]).double().square().sum()) for n in single)
    norm = sum(float((single[n] - initial[n]).double().square().sum()) for n in single)
    error = (diff / norm) ** 0.5
    assert norm > 0
    assert error <= TOLERANCE[dtype], f"{name} {case}: relative update error {error:.2e}"
