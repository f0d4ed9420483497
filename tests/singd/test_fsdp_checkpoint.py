"""Distributed checkpoints (DCP) of SINGD and KFAC on FSDP2: resume, and change world size.

One run of `STEPS` steps is cut in the middle (`CUT`) and saved with
``torch.distributed.checkpoint`` (the model's ``state_dict`` and the optimizer's
`singd.optim.checkpoint.dcp_state_dict`):

- two gloo ranks save, two fresh ranks load and continue: bit for bit the unbroken
  two-rank run;
- two ranks save, one process (no process group, an unsharded model) loads and
  continues on the whole batches: the unbroken two-rank run within 1e-6 (relative
  update);
- one process saves, two ranks load into a sharded model and continue: the unbroken
  one-process run within 1e-6.

The model has a LayerNorm: the fallback's (AdamW's) sharded moments travel too.
Marked slow (one spawn of two ranks and DCP writes: about 20 s here). Besides,
`state_bytes` counts this rank's shards of the momentum buffers and this rank's
layers' factors and, with ``total=True``, the whole (the single process's figure).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from singd.optim.checkpoint import dcp_state_dict, load_dcp
from tests.gloo import spawn
from tests.optimizers import factory

WORLD = 2
STEPS, CUT = 8, 4
BATCH = 8
TOLERANCE = 1e-6
SPECS = {
    "singd:hierarchical15_15/dense": factory(
        "singd:hierarchical15_15/dense", lr=0.05, lr_cov=0.05, T=1
    ),
    "kfac:cholesky": factory("kfac:cholesky", lr=0.05, damping=1e-2, T=1),
}


def build(spec: str, sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5))
    if sharded:
        fully_shard(model[0])
        fully_shard(model[3])
        fully_shard(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorm goes to the fallback
        return model, SPECS[spec](model, loss_average="batch")


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 33, generator=generator), torch.randint(
        5, (STEPS, BATCH), generator=generator
    )


def train(model, optimizer, steps: range, rank: int, world: int) -> None:
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    inputs, targets = batches()
    for step in steps:
        loss = nn.functional.cross_entropy(model(inputs[step][rows]), targets[step][rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def save(model, optimizer, path: Path) -> None:
    dcp.save(
        {"model": model.state_dict(), "optimizer": dcp_state_dict(optimizer)}, checkpoint_id=path
    )


def load(model, optimizer, path: Path) -> None:
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    load_dcp(optimizer, path)


def _worker(rank: int, world: int, out: str) -> None:
    out = Path(out)
    results = {}
    for spec in SPECS:
        model, optimizer = build(spec, sharded=True)
        train(model, optimizer, range(CUT), rank, world)
        save(model, optimizer, out / f"{spec}-two")
        train(model, optimizer, range(CUT, STEPS), rank, world)
        results[spec, "unbroken"] = full_params(model)
        results[spec, "bytes"] = (optimizer.state_bytes(), optimizer.state_bytes(total=True))

        model, optimizer = build(spec, sharded=True)
        load(model, optimizer, out / f"{spec}-two")
        train(model, optimizer, range(CUT, STEPS), rank, world)
        results[spec, "resumed"] = full_params(model)

        model, optimizer = build(spec, sharded=True)
        load(model, optimizer, out / f"{spec}-one")
        train(model, optimizer, range(CUT, STEPS), rank, world)
        results[spec, "from_one"] = full_params(model)
    torch.save(results, out / f"rank{rank}.pt")


def relative_update_error(got: dict, want: dict, initial: dict) -> float:
    diff = sum(float((got[n] - want[n]).double().square().sum()) for n in want)
    norm = sum(float((want[n] - initial[n]).double().square().sum()) for n in want)
    assert norm > 0
    return (diff / norm) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The one-process runs (unbroken, and cut and saved), then the two ranks."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dcp")
    single = {}
    for spec in SPECS:
        model, optimizer = build(spec, sharded=False)
        single[spec, "initial"] = full_params(model)
        train(model, optimizer, range(CUT), 0, 1)
        save(model, optimizer, out / f"{spec}-one")
        train(model, optimizer, range(CUT, STEPS), 0, 1)
        single[spec, "unbroken"] = full_params(model)
        single[spec, "bytes"] = optimizer.state_bytes()
    spawn(_worker, str(out), world=WORLD)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"out": out, "single": single, "ranks": ranks}


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_two_ranks_resume_bit_for_bit(runs, spec):
    for rank in runs["ranks"]:
        for name, value in rank[spec, "unbroken"].items():
            assert torch.equal(rank[spec, "resumed"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_one_process_continues_a_two_rank_checkpoint(runs, spec):
    model, optimizer = build(spec, sharded=False)
    load(model, optimizer, runs["out"] / f"{spec}-two")
    assert optimizer.steps == CUT
    train(model, optimizer, range(CUT, STEPS), 0, 1)
    initial = runs["single"][spec, "initial"]
    unbroken = runs["ranks"][0][spec, "unbroken"]
    error = relative_update_error(full_params(model), unbroken, initial)
    assert error <= TOLERANCE, f"{spec}: 2 -> 1 relative update error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_two_ranks_continue_a_one_process_checkpoint(runs, spec):
    initial = runs["single"][spec, "initial"]
    for rank in runs["ranks"]:
        got = rank[spec, "from_one"]
        error = relative_update_error(got, runs["single"][spec, "unbroken"], initial)
        assert error <= TOLERANCE, f"{spec}: 1 -> 2 relative update error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_state_bytes_count_this_ranks_shards_and_the_total(runs, spec):
    single = runs["single"][spec, "bytes"]
    ranks = [rank[spec, "bytes"] for rank in runs["ranks"]]
    for own, total in ranks:
        assert total == single
        for category in ("param_buffers", "fallback"):
            assert 0 < own[category] < total[category]
    for category in set(single) - {"param_buffers", "fallback", "accumulators"}:
        # each layer's factors on one rank: together the whole, each rank a part
        assert sum(own[category] for own, _ in ranks) == single[category]
        assert all(0 < own[category] < single[category] for own, _ in ranks)
    # (AdamW's step counters are 0-d tensors every rank holds whole: not summed here.)
    assert sum(own["param_buffers"] for own, _ in ranks) == single["param_buffers"]
