"""The memory planner's per-rank figures against real FSDP2 ranks, and the CLI's options.

Two real gloo ranks shard the suite's MLP (every dimension even, so FSDP's shards are
equal and the planner's ``ceil(entries / world size)`` is exact) with ``fully_shard``,
train two steps with each optimizer and report ``state_bytes()``: the parameters' state
of each rank, and the factors of the most loaded rank, equal
``state_bytes(..., world_size=2, sharding="fsdp")``.
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
from precision_lab.memory import build_meta_model, model_shape, plan_memory, state_bytes
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


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_fsdp_formula_equals_the_most_loaded_ranks_state(ranks, spec):
    """The parameters' state: each rank's equals the formula; the factors: each rank
    holds its layers', the most loaded rank what the formula says, and together the
    whole (the single process's), within the bound of the issue."""
    shape = model_shape(models.MLP())
    predicted = state_bytes(spec, shape, torch.float32, world_size=2, sharding="fsdp")
    whole = state_bytes(spec, shape, torch.float32)
    measured = [dict(rank[spec]) for rank in ranks]
    second_order = [c for c in ("factors", "momenta", "inverses") if whole[c]]
    for rank in measured:
        assert rank.pop("accumulators", 0) == 0
        for category in ("param_buffers", "fallback"):
            assert rank.get(category, 0) == predicted[category], category
    held = [sum(rank.get(c, 0) for c in second_order) for rank in measured]
    assert max(held) == sum(predicted[c] for c in second_order)
    assert sum(held) == sum(whole[c] for c in second_order)
    largest = max(
        sum(state_bytes(spec, model_shape(layer), torch.float32)[c] for c in second_order)
        for layer in models.MLP()
        if isinstance(layer, torch.nn.Linear)
    )
    for rank in measured:  # the bound
        assert sum(rank.values()) <= sum(whole.values()) / 2 + largest
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
    else:  # the factors of a share of the layers, the parameters' state an eighth
        assert plan.rows["ingd"]["factors"] < single.rows["ingd"]["factors"] / 4
        entries = single.rows["ingd"]["param_buffers"] // 2  # bfloat16
        assert plan.rows["ingd"]["param_buffers"] == -(-entries // 8) * 2


@pytest.mark.parametrize("args", [("--world-size", "0"), ("--sharding", "zero3")])
def test_bad_world_size_or_sharding_is_exit_2(args):
    result = _invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_readme_per_rank_table_is_the_planners():
    """README's "Past one machine" table: the planner's figures, to three digits."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Past one machine", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `([^`]+)` \| ([\d.]+) GB \| ([\d.]+) GB \| ([\d.]+) GB \|$", section, re.M
    )
    assert len(rows) == 6
    meta = build_meta_model("transformer", 4096, 32)
    specs = [spec for spec, *_ in rows]
    plans = [
        plan_memory(meta, torch.bfloat16, specs),
        plan_memory(meta, torch.bfloat16, specs, 8, "fsdp"),
        plan_memory(meta, torch.bfloat16, specs, 64, "fsdp"),
    ]
    for spec, *figures in rows:
        for plan, figure in zip(plans, figures, strict=True):
            assert f"{plan.total(spec) / 1e9:.3g}" == figure, (spec, plan.world_size)
