"""Sharded parameters the Kronecker optimizers cannot train are named at construction.

Over two real gloo ranks: a layer left out of ``fully_shard`` in a sharded model (its
gradient would stay per rank) and a layer split by tensor parallelism (its forward runs
on a shard, so its hooks would see a shard of the activations) each raise one sentence
naming the parameter; a sharded model whose parameters are all FSDP shards builds; an
optimizer built before ``fully_shard`` (which replaces the parameters it holds) is named
at its first step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from tests.gloo import spawn
from tests.optimizers import KRONECKER, factory


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _unsharded_layer() -> nn.Module:
    model = _model()
    fully_shard(model[0])  # model[2] and the root stay plain
    return model


def _tensor_parallel() -> nn.Module:
    model = _model()
    mesh = init_device_mesh("cpu", (2,))
    parallelize_module(model, mesh, {"0": ColwiseParallel()})
    return model


def _fully_sharded() -> nn.Module:
    model = _model()
    fully_shard(model)
    return model


BUILDERS = {"unsharded": _unsharded_layer, "tensor_parallel": _tensor_parallel}


def _worker(rank: int, world: int, out: str) -> None:
    results = {}
    for spec in KRONECKER:
        for name, build in BUILDERS.items():
            try:
                factory(spec, lr=0.1)(build())
                results[spec, name] = None
            except ValueError as error:
                results[spec, name] = str(error)
        factory(spec, lr=0.1)(_fully_sharded())
        model = _model()
        optimizer = factory(spec, lr=0.1)(model)
        fully_shard(model)
        model(torch.ones(2, 4)).sum().backward()
        try:
            optimizer.step()
            results[spec, "built_before"] = None
        except ValueError as error:
            results[spec, "built_before"] = str(error)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def messages(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("validation")
    spawn(_worker, str(out))
    return torch.load(out / "rank0.pt", weights_only=True)


@pytest.mark.parametrize("spec", KRONECKER)
def test_a_plain_layer_in_a_sharded_model_is_named(messages, spec):
    message = messages[spec, "unsharded"]
    assert message is not None and "'2.weight' is a plain tensor" in message
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.parametrize("spec", KRONECKER)
def test_a_tensor_parallel_layer_is_named(messages, spec):
    message = messages[spec, "tensor_parallel"]
    assert message is not None and "'0.weight'" in message
    assert "does not gather for the forward pass" in message


@pytest.mark.parametrize("spec", KRONECKER)
def test_an_optimizer_built_before_fully_shard_is_named_at_its_first_step(messages, spec):
    message = messages[spec, "built_before"]
    assert message is not None and "layer '0' was replaced" in message
