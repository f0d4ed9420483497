"""SINGD's low-rank natural gradient (`singd.optim.lowrank`, issue 18).

Where a dense layer's ``.grad`` is exactly the product of the rows its curvature uses,
SINGD computes ``C C^T G K K^T`` from those rows; everywhere ``.grad`` may be something
else (clipped, replaced, accumulated, tied, hooked, un-scaled in place, under autocast)
it must take the dense path. Each case below is compared with ``ENABLED = False`` (the
dense path throughout) on the same model and batches: equal within rounding where the
low-rank path is taken, bitwise where it must not be, and the FLOP count says which
path ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from singd import SINGD
from singd.optim import lowrank
from singd.optim.functional import singd_natural_gradient_from_rows
from singd.structures.dense import DenseMatrix
from tests.gloo import spawn
from tests.host_reads import HostReads

D_IN, D_HID, D_OUT, ROWS = 160, 192, 150, 32


@pytest.fixture
def dense_path(monkeypatch):
    """Run a test body with the low-rank path switched off."""

    def switch(enabled: bool) -> None:
        monkeypatch.setattr(lowrank, "ENABLED", enabled)

    return switch


def _model(dtype: torch.dtype = torch.float64, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    if tied:  # a square layer whose weight another module holds too
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_HID))
        model.add_module("twin", nn.Linear(D_HID, D_HID))
        model.twin.weight = model[2].weight
    return model.to(dtype)


def _batches(steps: int, dtype: torch.dtype, out: int = D_OUT):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(ROWS, D_IN, generator=gen, dtype=dtype), torch.randn(ROWS, out, generator=gen))
        for _ in range(steps)
    ]


def _train(
    between: Callable[[nn.Module, SINGD], None] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    steps: int = 3,
    T: int = 1,
    passes: int = 1,
    tied: bool = False,
    set_to_none: bool = True,
    autocast: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    unscale: bool = False,
    param_hooks: bool = False,
) -> tuple[list[torch.Tensor], SINGD]:
    """Train ``steps`` steps; ``between(model, optimizer)`` runs after each backward."""
    model = _model(dtype, tied)
    for p in model.parameters() if param_hooks else ():
        p.register_hook(lambda grad: grad * 0.5)  # autograd accumulates the halved grad
    optimizer = SINGD(
        model,
        lr=0.1,
        lr_cov=0.1,
        T=T,
        structures=("dense", "dense"),
        init_grad_scale=1.0 if scaler is None else scaler.get_scale(),
    )
    out = D_HID if tied else D_OUT
    for x, y in _batches(steps, dtype, out):
        optimizer.zero_grad(set_to_none=set_to_none)
        for _ in range(passes):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x).to(y.dtype), y) / passes
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if between is not None:
            between(model, optimizer)
        if scaler is None:
            optimizer.step()
            continue
        if unscale:  # the recipe for clipping; then the optimizer must be told the scale
            scaler.unscale_(optimizer)
            optimizer.set_current_grad_scale(scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], optimizer


def _relative_gap(ours: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, dense, strict=True)
    )


@pytest.mark.parametrize("T", [1, 2])
def test_low_rank_steps_match_the_dense_path_in_float64(dense_path, T):
    ours, optimizer = _train(steps=4, T=T)
    dense_path(False)
    dense, reference = _train(steps=4, T=T)
    assert optimizer._low_rank.taken == 2 * (4 // T)  # both layers, every update step
    assert reference._low_rank.taken == 0
    assert _relative_gap(ours, dense) < 1e-12


def test_low_rank_step_in_float32_is_within_rounding(dense_path):
    ours, optimizer = _train(dtype=torch.float32)
    dense_path(False)
    dense, _ = _train(dtype=torch.float32)
    assert optimizer._low_rank.taken == 6
    assert _relative_gap(ours, dense) < 1e-5


def test_low_rank_step_counts_fewer_flops(dense_path):
    def flops() -> int:
        model = _model()
        optimizer = SINGD(model, lr=0.1, T=1, structures=("dense", "dense"))
        x, y = _batches(1, torch.float64)[0]
        nn.functional.mse_loss(model(x), y).backward()
        with FlopCounterMode(display=False) as counter:
            optimizer.step()
        return counter.get_total_flops()

    low = flops()
    dense_path(False)
    full = flops()
    # The factor update is the same on both paths; the natural gradients are not.
    assert low < 0.8 * full


def _clip(model, _):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


def _replace(model, _):
    for p in model.parameters():
        p.grad = p.grad * 0.5


def _in_place(model, _):
    model[2].weight.grad.mul_(0.5)


def _second_backward(model, _):  # autograd adds to .grad, the layer's hooks do not run
    model[2].weight.square().sum().backward()


CHANGED_GRADIENTS = {
    "clip_grad_norm_": dict(between=_clip),
    "grad replaced": dict(between=_replace),
    "grad changed in place": dict(between=_in_place),
    "weight's grad accumulated again": dict(between=_second_backward),
    "accumulated over two passes": dict(passes=2),
    "zero_grad(set_to_none=False)": dict(set_to_none=False),
    "tied weight": dict(tied=True),
    "tensor hooks on the parameters": dict(param_hooks=True),
}


@pytest.mark.parametrize("case", CHANGED_GRADIENTS, ids=list(CHANGED_GRADIENTS))
def test_a_gradient_that_may_differ_from_the_rows_takes_the_dense_path(dense_path, case):
    kwargs = CHANGED_GRADIENTS[case]
    ours, optimizer = _train(**kwargs)
    dense_path(False)
    dense, _ = _train(**kwargs)
    # Where only the last layer's gradient changed, the first layer takes the low-rank
    # path: equal within rounding (the last layer's unchanged rows would be 2x off).
    partly = case in ("grad changed in place", "weight's grad accumulated again", "tied weight")
    # zero_grad(set_to_none=False) leaves .grad None until the first backward pass.
    first_step = case == "zero_grad(set_to_none=False)"
    assert optimizer._low_rank.taken == (3 if partly else 2 if first_step else 0)
    assert _relative_gap(ours, dense) < 1e-12
    if not (partly or first_step):
        for a, b in zip(ours, dense, strict=True):
            assert torch.equal(a, b)


def test_autocast_takes_the_dense_path(dense_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, optimizer = _train(dtype=torch.float32, autocast=True)
        dense_path(False)
        dense, _ = _train(dtype=torch.float32, autocast=True)
    assert optimizer._low_rank.taken == 0
    for a, b in zip(ours, dense, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unscale", [False, True], ids=["scaler.step", "unscale_ first"])
def test_grad_scaler(dense_path, unscale):
    def run() -> tuple[list[torch.Tensor], SINGD]:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return _train(dtype=torch.float32, scaler=scaler, unscale=unscale)

    ours, optimizer = run()
    dense_path(False)
    dense, _ = run()
    if unscale:  # .grad divided in place, unseen by its version counter
        assert optimizer._low_rank.taken == 0
        for a, b in zip(ours, dense, strict=True):
            assert torch.equal(a, b)
    else:  # the scale divides the rows' product as it divides .grad
        assert optimizer._low_rank.taken == 6
        assert _relative_gap(ours, dense) < 1e-5


def test_rows_do_not_outlive_the_step():
    model = _model()
    optimizer = SINGD(model, lr=0.1, T=1, structures=("dense", "dense"))
    x, y = _batches(1, torch.float64)[0]
    nn.functional.mse_loss(model(x), y).backward()
    kept = list(optimizer._low_rank._rows.values())
    assert len(kept) == 2 and all(rows is not None for rows in kept)
    # The rows wait with the curvature terms, and are counted with them.
    terms = sum(
        state[key].nbytes for state in optimizer._factors.values() for key in ("H_K", "H_C")
    )
    rows = sum(r.a.nbytes + r.g.nbytes for r in kept)
    assert rows == ROWS * (D_IN + 1 + D_HID + D_HID + 1 + D_OUT) * 8
    assert optimizer.state_bytes()["accumulators"] == terms + rows
    optimizer.step()
    assert optimizer._low_rank._rows == {}
    assert optimizer.state_bytes()["accumulators"] == 0
    optimizer.remove_hooks()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_low_rank_steps_read_nothing_from_the_device():
    model = _model(torch.float32)
    optimizer = SINGD(model, lr=0.1, T=1, structures=("dense", "dense"))
    batches = _batches(4, torch.float32)

    def step(x, y):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    step(*batches[0])
    with HostReads() as reads:
        for x, y in batches[1:]:
            step(x, y)
    assert optimizer._low_rank.taken == 8
    assert sum(reads.kinds.values()) == 0


@pytest.mark.parametrize(
    ("dim_K", "dim_C", "rows", "taken"),
    [
        (513, 512, 128, True),  # the benchmark MLP's hidden layer
        (257, 512, 128, True),  # its first layer
        (513, 10, 128, False),  # its output layer: narrower than MIN_DIM
        (513, 512, 512, False),  # as many rows as columns: the dense path is cheaper
        (64, 64, 4, False),  # small: overheads, not FLOPs
    ],
)
def test_the_path_is_taken_where_it_saves_flops(dim_K, dim_C, rows, taken):
    assert lowrank.pays(dim_K, dim_C, rows) is taken


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float64)])
def test_natural_gradient_from_rows_against_dense_algebra(dtypes):
    gen = torch.Generator().manual_seed(2)
    rows, dim_K, dim_C = 7, 12, 9
    k = torch.randn(dim_K, dim_K, generator=gen, dtype=torch.float64)
    c = torch.randn(dim_C, dim_C, generator=gen, dtype=torch.float64)
    a = torch.randn(rows, dim_K, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, dim_C, generator=gen, dtype=torch.float64)
    K, C = DenseMatrix.from_dense(k.to(dtypes[0])), DenseMatrix.from_dense(c.to(dtypes[1]))
    nat = singd_natural_gradient_from_rows(K, C, a, g, torch.tensor(3.0, dtype=torch.float64))
    expected = c @ c.T @ (3.0 * g.T @ a) @ k @ k.T
    assert nat.dtype == dtypes[1]
    tol = 1e-12 if dtypes[0] == torch.float64 else 1e-5
    torch.testing.assert_close(nat, expected, rtol=tol, atol=tol * expected.abs().max().item())


def _compiled_run() -> tuple[list[torch.Tensor], int]:
    model = _model()
    optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=("dense", "dense"))
    forward = torch.compile(model, backend="aot_eager")
    for x, y in _batches(3, torch.float64):
        optimizer.zero_grad()
        nn.functional.mse_loss(forward(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer._low_rank.taken


@pytest.mark.slow
def test_a_compiled_model_takes_the_low_rank_path_too(dense_path):
    """``torch.compile`` (aot_eager): the hooks run in the backward pass as in eager mode,
    so the rows are kept and used, with the dense path's result."""
    torch._dynamo.reset()
    ours, taken = _compiled_run()
    dense_path(False)
    dense, none = _compiled_run()
    assert (taken, none) == (6, 0)
    assert _relative_gap(ours, dense) < 1e-12


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_backward_pass_that_builds_a_graph_keeps_rows_without_a_graph(dense_path):
    def run() -> tuple[list[torch.Tensor], SINGD]:
        model = _model()
        optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=("dense", "dense"))
        for x, y in _batches(3, torch.float64):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward(create_graph=True)
            assert not any(r.a.requires_grad for r in optimizer._low_rank._rows.values())
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], optimizer

    ours, optimizer = run()
    dense_path(False)
    dense, _ = run()
    assert optimizer._low_rank.taken == 6
    assert _relative_gap(ours, dense) < 1e-12


def _ddp_worker(rank: int, world: int, out: str) -> None:
    model = nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=True)
    optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=("dense", "dense"))
    generator = torch.Generator().manual_seed(rank)  # each rank its own batch
    for _ in range(2):
        x = torch.randn(ROWS, D_IN, generator=generator, dtype=torch.float64)
        y = torch.randn(ROWS, D_OUT, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"params": params, "taken": optimizer._low_rank.taken}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_takes_the_dense_path(tmp_path):
    """Under DDP ``.grad`` is averaged over the ranks, each rank's rows are its own: the
    rows must not be used (the ranks' parameters would part)."""
    spawn(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["taken"] for r in ranks] == [0, 0]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kfac_approx", "loss_average"),
    [("expand", "batch"), ("expand", "batch+sequence"), ("expand", None), ("reduce", "batch")],
)
def test_sequence_inputs(dense_path, kfac_approx, loss_average):
    """A (batch, sequence, features) input gives ``batch x sequence`` rows with
    ``expand``: the gradient is still their product, whatever the loss averages over.
    ``reduce`` averages the rows over the sequence: their product is not the gradient,
    and the dense path must run."""

    def run() -> tuple[list[torch.Tensor], SINGD]:
        model = _model()
        optimizer = SINGD(
            model,
            lr=0.1,
            lr_cov=0.1,
            T=1,
            structures=("dense", "dense"),
            kfac_approx=kfac_approx,
            loss_average=loss_average,
        )
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(4, 8, D_IN, generator=gen, dtype=torch.float64)
            y = torch.randn(4, 8, D_OUT, generator=gen, dtype=torch.float64)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], optimizer

    ours, optimizer = run()
    dense_path(False)
    dense, _ = run()
    if kfac_approx == "reduce":
        assert optimizer._low_rank.taken == 0
        assert all(torch.equal(a, b) for a, b in zip(ours, dense, strict=True))
    else:
        assert optimizer._low_rank.taken == 6
        assert _relative_gap(ours, dense) < 1e-12
