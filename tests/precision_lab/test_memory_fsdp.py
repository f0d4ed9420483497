"""The memory planner's per-rank figures against real FSDP2 ranks, and the CLI's options.

Two real gloo ranks shard the suite's MLP (every dimension even, so FSDP's shards are
equal and the planner's ``ceil(entries / world size)`` is exact) with ``fully_shard``,
train two steps with each optimizer and report ``state_bytes()``: this rank's bytes
equal ``state_bytes(..., world_size=2, sharding="fsdp")`` category by category.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.distributed.fsdp import fully_shard

from precision_lab.cli import cli
from precision_lab.memory import CATEGORIES, build_meta_model, model_shape, plan_memory, state_bytes
from precision_lab.specs import parse_spec
from precision_lab.workloads import models
from tests.gloo import spawn

SPECS = ("singd:diagonal", "ingd", "ikfac", "singd:hierarchical15_15/dense", "kfac:cholesky")


def _worker(rank: int, world: int, out: str) -> None:
    measured = {}
    for spec in SPECS:
        torch.manual_seed(0)
        model = models.MLP()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = parse_spec(spec).build(model)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x = torch.randn(4, models.NUM_FEATURES, generator=generator)
            F.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=generator)).backward()
            optimizer.step()
            optimizer.zero_grad()
        measured[spec] = optimizer.state_bytes()
    torch.save(measured, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("memory")
    spawn(_worker, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("spec", SPECS)
def test_fsdp_formula_equals_each_ranks_state(ranks, spec):
    shape = model_shape(models.MLP())
    predicted = state_bytes(spec, shape, torch.float32, world_size=2, sharding="fsdp")
    whole = state_bytes(spec, shape, torch.float32)
    for rank in ranks:
        measured = dict(rank[spec])
        assert measured.pop("accumulators", 0) == 0
        for category in CATEGORIES:
            assert measured.get(category, 0) == predicted[category], category
    assert 0 < predicted["param_buffers"] < whole["param_buffers"]


def _invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["memory", *args])


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_the_table_is_per_rank(sharding):
    args = ("--d-model", "1024", "--layers", "4", "--dtype", "bf16", "--optimizers", "ingd,adamw")
    result = _invoke(*args, "--world-size", "8", "--sharding", sharding)
    assert result.exit_code == 0, result.output
    assert f"per rank of 8 ({sharding})" in result.output
    meta = build_meta_model("transformer", 1024, 4)
    plan = plan_memory(meta, torch.bfloat16, ["ingd", "adamw"], 8, sharding)
    line = next(ln for ln in result.output.splitlines() if re.search(r"\singd\s", ln))
    unit, scale = ("GB", 1e9) if plan.total("ingd") >= 1e9 else ("MB", 1e6)
    assert f"({unit})" in result.output
    assert f"{plan.total('ingd') / scale:.3g}" in line
    single = plan_memory(meta, torch.bfloat16, ["ingd"])
    if sharding == "ddp":
        assert plan.rows["ingd"] == single.rows["ingd"]
    else:  # the factors stay whole, the parameters' state is an eighth (rounded up)
        assert plan.rows["ingd"]["factors"] == single.rows["ingd"]["factors"]
        entries = single.rows["ingd"]["param_buffers"] // 2  # bfloat16
        assert plan.rows["ingd"]["param_buffers"] == -(-entries // 8) * 2


@pytest.mark.parametrize("args", [("--world-size", "0"), ("--sharding", "zero3")])
def test_bad_world_size_or_sharding_is_exit_2(args):
    result = _invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
