"""SINGD and KFAC on FSDP2-sharded models over two real gloo processes equal one process.

Two CPU processes join a gloo group (`tests.gloo.spawn`); each wraps the same small MLP
with ``fully_shard`` and trains it on its half of every batch; the parent process
trains the same model unsharded on the whole batches. Wrappings:

- ``nested``: ``fully_shard`` on each Linear and on the root (rows sharded, the
  default ``Shard(0)``; 16 and 5 rows over two ranks: even and uneven shards);
- ``root``: ``fully_shard`` on the root only;
- ``columns``: nested, the second weight sharded along the input dimension
  (``shard_placement_fn`` -> ``Shard(1)``), which the optimizer must gather and slice
  otherwise than rows;
- ``mixed``: nested with ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``: compared with the same policy on one rank (a bfloat16
  forward cannot equal a float32 process), within bfloat16's tolerance; the factors
  stay in the sharded weights' float32.

For every optimizer (SINGD with every structure, IKFAC, KFAC) and wrapping, after
`STEPS` steps: each layer's factors are held by one rank (sharded state; both ranks own
some) and equal the single process's within 1e-5 (relative Frobenius norm), the gathered
parameters agree bit for bit across ranks, and their update equals the single
process's, ``||(p_dist - p_0) - (p_single - p_0)|| / ||p_single - p_0||`` at most 1e-5
(float32). The LayerNorm goes to the fallback (AdamW on DTensors).
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from singd.structures.registry import STRUCTURE_NAMES
from tests.gloo import spawn
from tests.optimizers import factory

WORLD = 2
STEPS = 10
BATCH = 8
SPECS = [f"singd:{name}" for name in STRUCTURE_NAMES] + ["ikfac", "kfac:cholesky"]
CASES = [(spec, wrap, "batch") for spec, wrap in itertools.product(SPECS, ("nested", "root"))]
CASES += [(spec, "columns", None) for spec in ("singd:dense", "ikfac", "kfac:cholesky")]
CASES += [(spec, "nested", None) for spec in ("singd:diagonal", "kfac:cholesky")]
MIXED = [(spec, "mixed", "batch") for spec in ("singd:diagonal", "singd:dense", "kfac:cholesky")]
QUICK = [
    ("singd:diagonal", "nested", "batch"),
    ("singd:hierarchical15_15", "root", "batch"),
    ("ikfac", "columns", None),
    ("kfac:cholesky", "nested", None),
]
"""One of each kind, in the default run (about 10 s); the rest is marked slow (about 40 s)."""
TOLERANCE = 1e-5
MIXED_TOLERANCE = 5e-2
"""bfloat16 forward: per-rank and whole-batch gradient sums round apart (about 4e-3
each step), and KFAC's damped inverse (damping 1e-2) amplifies it: 2.3e-2 measured."""


def optimizer_factory(spec: str):
    if spec.startswith("kfac"):
        return factory(spec, lr=0.05, damping=1e-2, T=1)
    return factory(spec, lr=0.05, lr_cov=0.05, T=1)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5))


def columns(param: torch.Tensor) -> Shard:
    """Weights sharded along the input dimension where it divides evenly (FSDP2 shards
    other dimensions than 0 evenly only): the second layer's ``5 x 16``."""
    even = param.dim() == 2 and param.shape[1] % dist.get_world_size() == 0
    return Shard(1) if even else Shard(0)


def shard(model: nn.Module, wrap: str) -> nn.Module:
    """Wrap ``model`` with ``fully_shard`` as ``wrap`` says (module docstring)."""
    options = {}
    if wrap == "columns":
        options["shard_placement_fn"] = columns
    if wrap == "mixed":
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if wrap != "root":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, BATCH, 33, generator=generator)
    targets = torch.randint(5, (STEPS, BATCH), generator=generator)
    return inputs, targets


def train(spec: str, wrap: str | None, loss_average: str | None, rank: int, world: int):
    """Train (sharded unless ``wrap`` is None) on this rank's rows; returns the full
    parameters and every layer's factors (dense) after the last step."""
    model = build_model()
    if wrap is not None:
        model = shard(model, wrap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorm goes to the fallback
        optimizer = optimizer_factory(spec)(model, loss_average=loss_average)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    reduction = "mean" if loss_average == "batch" else "sum"
    for x, y in zip(*batches(), strict=True):
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows], reduction=reduction)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }
    factors = {
        (view.name, key): f.to_dense() if hasattr(f, "to_dense") else f.clone()
        for view in optimizer.curvature_state()
        for key, f in view.factors.items()
        if f is not None
    }
    return {"params": params, "factors": factors}


def _worker(rank: int, world: int, out: str, cases: list) -> None:
    results = {case: train(*case, rank, world) for case in cases}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _spawn(tmp_path_factory, cases: list, world: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    spawn(_worker, str(out), cases, world=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def quick_ranks(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, QUICK, WORLD)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, CASES + MIXED, WORLD)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> list[dict]:
    """The mixed-precision cases on a one-rank FSDP group: the same bfloat16 forward."""
    return _spawn(tmp_path_factory, MIXED, 1)


def relative_update_error(got: dict, want: dict) -> float:
    initial = dict(build_model().named_parameters())
    diff = sum(float((got[n] - want[n]).double().square().sum()) for n in want)
    norm = sum(float((want[n] - initial[n].detach()).double().square().sum()) for n in want)
    assert norm > 0
    return (diff / norm) ** 0.5


def assert_ranks_agree(ranks: list[dict], case: tuple) -> dict:
    """Each layer's factors are held by one rank (sharded state) and the gathered
    parameters agree bit for bit; returns all ranks' factors."""
    mine, other = ranks[0][case], ranks[1][case]
    assert mine["factors"] and other["factors"]  # both ranks own layers
    assert not {layer for layer, _ in mine["factors"]} & {layer for layer, _ in other["factors"]}
    for name, value in mine["params"].items():
        assert torch.equal(value, other["params"][name]), f"ranks disagree on {name}"
    return mine["factors"] | other["factors"]


def assert_equals_one_process(ranks: list[dict], case: tuple) -> None:
    factors = assert_ranks_agree(ranks, case)
    torch.set_num_threads(1)
    spec, _, loss_average = case
    single = train(spec, None, loss_average, rank=0, world=1)
    error = relative_update_error(ranks[0][case]["params"], single["params"])
    assert error <= TOLERANCE, f"{case}: relative update error {error:.2e}"
    assert set(factors) == set(single["factors"])  # every layer's factors, on one rank
    for key, value in single["factors"].items():
        scale = float(value.double().norm())
        assert float((factors[key] - value).double().norm()) <= TOLERANCE * scale, key


def _ids(cases: list) -> list[str]:
    return ["-".join(map(str, c)) for c in cases]


@pytest.mark.parametrize("case", QUICK, ids=_ids(QUICK))
def test_two_sharded_ranks_equal_one_process(quick_ranks, case):
    assert_equals_one_process(quick_ranks, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_every_optimizer_and_wrapping_equals_one_process(ranks, case):
    assert_equals_one_process(ranks, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", MIXED, ids=_ids(MIXED))
def test_mixed_precision_policy_two_ranks_equal_one_rank(ranks, one_rank, case):
    factors = assert_ranks_agree(ranks, case)
    # The factors take the sharded (float32) weight's dtype, not the policy's bfloat16
    # that the layer computes with while its hooks run.
    assert {f.dtype for f in factors.values()} == {torch.float32}
    error = relative_update_error(ranks[0][case]["params"], one_rank[0][case]["params"])
    assert error <= MIXED_TOLERANCE, f"{case}: relative update error {error:.2e}"
