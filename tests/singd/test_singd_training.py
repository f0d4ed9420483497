"""SINGD in real training loops: fallback optimizer, accumulation, GradScaler, autocast."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from singd import SINGD
from tests.optimizers import factory


def mlp(dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(count: int, size: int = 16, dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(size, 6, generator=generator).to(dtype),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


HP = dict(lr=0.1, lr_cov=0.1, damping=0.01, T=1)


class TinyTransformer(nn.Module):
    """Embedding, one encoder layer (attention, LayerNorm) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 11)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def transformer_step(optimizer_kwargs):
    torch.manual_seed(0)
    model = TinyTransformer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = SINGD(model, **optimizer_kwargs)
        tokens = torch.randint(0, 11, (4, 5))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
    changed = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
    return optimizer, changed, [str(w.message) for w in caught]


def test_fallback_trains_a_whole_transformer():
    optimizer, changed, messages = transformer_step({"loss_average": "batch+sequence", **HP})
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    # out_proj is a Linear whose forward attention never calls: moved, with a warning.
    assert any("encoder.self_attn.out_proj" in m and "fallback" in m for m in messages)
    covered = {view.name for view in optimizer.curvature_state()}
    assert covered == {"encoder.linear1", "encoder.linear2", "head"}
    assert optimizer.state_bytes()["fallback"] > 0


def test_fallback_none_keeps_the_reference_behaviour():
    _, changed, messages = transformer_step({"fallback": None, **HP})
    untrained = {n for n, c in changed.items() if not c}
    assert "embed.weight" in untrained and "encoder.norm1.weight" in untrained
    assert "encoder.self_attn.out_proj.weight" in untrained
    assert "encoder.self_attn.in_proj_weight" in untrained
    assert "head.weight" not in untrained and "encoder.linear1.weight" not in untrained
    assert any("will not be trained" in m for m in messages)
    assert any("out_proj" in m and "left untrained" in m for m in messages)


def test_fallback_follows_the_learning_rate_and_a_custom_factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = SINGD(model, fallback=lambda groups: torch.optim.SGD(groups), **HP)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    before = model[1].weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    grad = model[1].weight.grad.clone()
    optimizer.step()
    scheduler.step()
    torch.testing.assert_close(model[1].weight, before - 0.1 * grad)
    assert optimizer.fallback.param_groups[0]["lr"] == 0.1  # synced at the next step
    optimizer.zero_grad()
    assert model[1].weight.grad is None
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert optimizer.fallback.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("kfac_like", [False, True])
@pytest.mark.parametrize("loss_average", ["batch", None])
def test_two_accumulated_backward_passes_equal_one_on_the_whole_batch(loss_average, kfac_like):
    """Mean losses are divided by the number of passes, summed losses are not."""
    reduction = "sum" if loss_average is None else "mean"
    runs = []
    for split in (False, True):
        model = mlp()
        optimizer = SINGD(model, loss_average=loss_average, kfac_like=kfac_like, alpha1=0.0, **HP)
        for X, y in data(4):
            optimizer.zero_grad()
            if split:
                for part in (slice(0, 8), slice(8, 16)):
                    loss = nn.functional.cross_entropy(model(X[part]), y[part], reduction=reduction)
                    (loss / 2 if loss_average else loss).backward()
            else:
                nn.functional.cross_entropy(model(X), y, reduction=reduction).backward()
            optimizer.step()
        runs.append(list(model.parameters()))
    for whole, split in zip(*runs, strict=True):
        torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


class TwoCalls(nn.Module):
    """One Linear run twice per forward, on the two halves of each sample's input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3).double()

    def forward(self, x):  # x: (B, 2, 6)
        return self.lin(x[:, 0]) + self.lin(x[:, 1])


class OverSequence(TwoCalls):
    """The same function with one call over a shared dimension of 2."""

    def forward(self, x):
        return self.lin(x).sum(dim=1)


class TwoCheckpointedCalls(TwoCalls):
    """The two calls, each in an activation-checkpointed segment of its own."""

    reentrant = True

    def forward(self, x):
        # A reentrant checkpoint gives the segment gradients only through inputs that
        # require one.
        x = x.detach().requires_grad_()
        segment = torch.utils.checkpoint.checkpoint
        return sum(segment(self.lin, x[:, i], use_reentrant=self.reentrant) for i in (0, 1))


class TwoNonReentrantCalls(TwoCheckpointedCalls):
    reentrant = False


def _train_on_pairs(cls, make_optimizer, split: bool) -> list[torch.Tensor]:
    """Four steps on batches of 16 samples of two 6-vectors; ``split``: each batch as two
    accumulated passes of 8 (mean losses divided by 2)."""
    generator = torch.Generator().manual_seed(3)
    model = cls()
    optimizer = make_optimizer(model)
    for _ in range(4):
        X = torch.randn(16, 2, 6, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        parts = (slice(0, 8), slice(8, 16)) if split else (slice(0, 16),)
        for part in parts:
            loss = nn.functional.cross_entropy(model(X[part]), y[part])
            (loss / len(parts)).backward()
        optimizer.step()
    return list(model.parameters())


OPTIMIZERS = {
    "singd": factory("singd:dense", alpha1=0.0, **HP),
    "ikfac": factory("ikfac", **HP),
    # KFAC averages A over calls and sums G (its accumulation keeps undivided losses).
    "kfac": factory("kfac", lr=0.1, damping=0.01, T=1, inverse_dtype=torch.float64),
}


@pytest.mark.parametrize(
    ("optimizer", "accumulate"),
    [("singd", False), ("singd", True), ("ikfac", False), ("ikfac", True), ("kfac", False)],
)
def test_a_layer_run_twice_per_forward_trains_like_one_run_over_a_shared_dimension(
    optimizer, accumulate
):
    """Two calls in one pass are rows of one batch ("expand"), not two accumulated passes:
    SINGD's output side is not rescaled by the number of calls (it was, by 2, before)."""
    make = OPTIMIZERS[optimizer]
    sequence = _train_on_pairs(OverSequence, make, split=False)
    twice = _train_on_pairs(TwoCalls, make, split=accumulate)
    for p, q in zip(twice, sequence, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [TwoCheckpointedCalls, TwoNonReentrantCalls])
@pytest.mark.parametrize(("optimizer", "accumulate"), [("singd", False), ("ikfac", True)])
def test_a_layer_shared_by_two_checkpointed_segments_is_one_pass(cls, optimizer, accumulate):
    """A reentrant checkpoint runs each segment's backward as a pass of its own, nested in
    the real one: the layer's two calls still make one backward pass, as without
    checkpointing (the output side was rescaled by 2 when they counted as two)."""
    make = OPTIMIZERS[optimizer]
    sequence = _train_on_pairs(OverSequence, make, split=False)
    twice = _train_on_pairs(cls, make, split=accumulate)
    for p, q in zip(twice, sequence, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class CheckpointedMLP(nn.Module):
    """Two Linear layers in an activation-checkpointed segment, then a Linear head."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.double()
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.body(x))
        segment = torch.utils.checkpoint.checkpoint
        return self.head(segment(self.body, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("optimizer", ["singd", "ikfac", "kfac"])
def test_activation_checkpointing_trains_exactly_as_without(optimizer, reentrant):
    """The recomputed forward (in the backward pass) adds no second curvature pass: four
    steps with every curvature update, float64, with two accumulated passes in the
    last, land on the parameters of the same training without checkpointing."""
    runs = []
    for checkpointed in (None, reentrant):
        model = CheckpointedMLP(checkpointed)
        opt = OPTIMIZERS[optimizer](model)
        for i, (x, y) in enumerate(data(4)):
            opt.zero_grad()
            parts = (slice(0, 8), slice(8, 16)) if i == 3 else (slice(0, 16),)
            for part in parts:
                # A reentrant checkpoint gives its segment gradients only through inputs
                # that require one.
                loss = nn.functional.cross_entropy(model(x[part].requires_grad_()), y[part])
                (loss / len(parts)).backward()
            opt.step()
        runs.append(list(model.parameters()))
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_checkpoint_between_accumulated_passes_resumes_exactly(tmp_path):
    """Saved after the first of two passes of a shared-weight layer (IKFAC, where the
    pass count scales H_C): the resumed run counts the calls and passes it had."""
    generator = torch.Generator().manual_seed(4)
    X = torch.randn(16, 2, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)

    def make():
        model = TwoCalls()
        return model, OPTIMIZERS["ikfac"](model)

    def half(model, part):
        (nn.functional.cross_entropy(model(X[part]), y[part]) / 2).backward()

    model, optimizer = make()
    for part in (slice(0, 8), slice(8, 16)):
        half(model, part)
    optimizer.step()

    first, first_optimizer = make()
    half(first, slice(0, 8))
    torch.save(
        {"model": first.state_dict(), "optimizer": first_optimizer.state_dict()},
        tmp_path / "mid.pt",
    )
    grads = [p.grad.clone() for p in first.parameters()]
    checkpoint = torch.load(tmp_path / "mid.pt", weights_only=True)
    resumed, resumed_optimizer = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for p, grad in zip(resumed.parameters(), grads, strict=True):
        p.grad = grad  # gradients live in the training loop's state, not the optimizer's
    half(resumed, slice(8, 16))
    resumed_optimizer.step()
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def train(model, optimizer, batches, scaler=None, autocast_dtype=None):
    losses = []
    for X, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(X), y)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return losses


def test_grad_scaler_un_scales_exactly():
    """A constant scale of 2^10 changes nothing: H_C and the gradient are un-scaled."""
    plain_model, scaled_model = mlp(), mlp()
    train(plain_model, SINGD(plain_model, **HP), data(5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    optimizer = SINGD(scaled_model, init_grad_scale=2.0**10, **HP)
    train(scaled_model, optimizer, data(5), scaler)
    for plain, scaled in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=1e-14)


def test_grad_scaler_with_a_changing_scale_un_scales_exactly():
    """The scale doubles every step: the two-step bookkeeping must follow it."""
    plain_model, scaled_model = mlp(), mlp()
    train(plain_model, SINGD(plain_model, **HP), data(5))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    train(scaled_model, SINGD(scaled_model, init_grad_scale=4.0, **HP), data(5), scaler)
    assert scaler.get_scale() == 4.0 * 2**5
    for plain, scaled in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=1e-14)


def test_grad_scaler_skips_a_step_with_infs_and_clears_the_curvature():
    model = mlp(torch.float32)
    optimizer = SINGD(model, init_grad_scale=2.0**8, **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = data(3, dtype=torch.float32)
    train(model, optimizer, batches[:1], scaler)
    before = [p.detach().clone() for p in model.parameters()]
    factors = [v.factors["K"].to_dense().clone() for v in optimizer.curvature_state()]
    X, y = batches[1]
    X = X.clone()
    X[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="skipping this step"):
        train(model, optimizer, [(X, y)], scaler)
    assert scaler.get_scale() == 2.0**7
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    for view, K in zip(optimizer.curvature_state(), factors, strict=True):
        assert torch.equal(view.factors["K"].to_dense(), K)
        assert view.counters["skipped_steps"] == 1
    assert optimizer.state_bytes()["accumulators"] == 0
    losses = train(model, optimizer, batches[2:], scaler)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and losses[0] < 5


def test_init_grad_scale_warning():
    model = mlp(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with pytest.warns(UserWarning, match="init_grad_scale"):
        train(model, SINGD(model, **HP), data(1, dtype=torch.float32), scaler)


def float32_reference(steps: int = 15):
    """An MLP trained in float32 on one batch, and its starting point."""
    model = mlp(torch.float32)
    start = [p.detach().clone() for p in model.parameters()]
    X, y = data(1, size=64, dtype=torch.float32)[0]
    losses = train(model, SINGD(model, **HP), [(X, y)] * steps)
    assert losses[-1] < 0.85 * losses[0]  # it does learn, so the updates are not noise
    return model, start, (X, y)


def update_error(model, reference, start) -> float:
    """``||(p - p0) - (p_ref - p0)|| / ||p_ref - p0||`` over all parameters."""
    pairs = zip(model.parameters(), reference.parameters(), start, strict=True)
    ours, ref = (
        torch.cat(d)
        for d in zip(
            *[((p.float() - s).flatten(), (r - s).flatten()) for p, r, s in pairs], strict=True
        )
    )
    return ((ours - ref).norm() / ref.norm()).item()


# Tolerance: 10 unit roundoffs of the lowest precision in play, over 15 steps. Measured
# (this CPU, torch 2.13): bf16 autocast 5.6e-3 (1.4 eps), fp16 autocast + GradScaler
# 5.3e-4 (1.1 eps), float64 K on a float32 model 2.6e-7 (2.2 eps of float32), pure bf16
# weights and factors 1.7e-2 (4.2 eps).
def tolerance(dtype: torch.dtype) -> float:
    return 10 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_tracks_float32(dtype):
    """Mixed precision: float32 weights and factors, autocast inputs and gradients."""
    reference, start, (X, y) = float32_reference()
    model = mlp(torch.float32)
    optimizer = SINGD(model, init_grad_scale=2.0**8, **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if dtype == torch.float16 else None
    train(model, optimizer, [(X, y)] * 15, scaler, autocast_dtype=dtype)
    assert update_error(model, reference, start) < tolerance(dtype)
    for view in optimizer.curvature_state():
        assert view.factors["K"].dtype == torch.float32


def test_preconditioner_dtype_per_factor():
    reference, start, (X, y) = float32_reference()
    model = mlp(torch.float32)
    optimizer = SINGD(model, preconditioner_dtype=(torch.float64, None), **HP)
    train(model, optimizer, [(X, y)] * 15)
    assert update_error(model, reference, start) < tolerance(torch.float32)
    for view in optimizer.curvature_state():
        assert view.factors["K"].dtype == torch.float64
        assert view.factors["C"].dtype == torch.float32
        assert view.factors["m_K"].dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_pure_bfloat16_training_tracks_float32():
    reference, start, (X, y) = float32_reference()
    model = mlp(torch.bfloat16)
    optimizer = SINGD(model, **HP)
    train(model, optimizer, [(X.bfloat16(), y)] * 15)
    assert update_error(model, reference, start) < tolerance(torch.bfloat16)
    assert all(v.factors["K"].dtype == torch.bfloat16 for v in optimizer.curvature_state())


def test_lr_cov_schedule_is_called_with_the_step_and_equals_constants():
    calls = []

    def schedule(step: int) -> float:
        calls.append(step)
        return 0.1

    runs = []
    for lr_cov in (0.1, schedule):
        model = mlp()
        train(model, SINGD(model, **{**HP, "lr_cov": lr_cov, "T": 2}), data(5))
        runs.append(list(model.parameters()))
    assert calls == [0, 0, 2, 2, 4, 4]  # two layers, updates at steps 0, 2, 4
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_closure_is_evaluated():
    model = mlp()
    optimizer = SINGD(model, **HP)
    X, y = data(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    first = optimizer.step(closure)
    assert first.item() > optimizer.step(closure).item()


EAGER_CASES = {
    "singd:dense": factory("singd:dense", **HP),
    "singd:diagonal": factory("singd:diagonal", **HP),
    "ikfac": factory("ikfac", **HP),
    "kfac": factory("kfac", lr=0.1, damping=0.01, T=1),
}


@pytest.mark.parametrize("optimizer", list(EAGER_CASES))
def test_reducing_the_input_in_the_forward_trains_bit_for_bit_as_in_the_backward(
    monkeypatch, optimizer
):
    """The input statistic computed in the forward hook (under saved-tensor hooks, here
    identity ones, the layer's input then need not wait for the backward pass) or in
    the backward hook: the same parameters to the bit, under bfloat16 autocast (the
    forward hook must not compute it in bfloat16) and with two accumulated passes."""
    runs = []
    for ratio in (0, 10**12):  # always in the forward; never
        monkeypatch.setattr("singd.optim.hooks.EAGER_INPUT_RATIO", ratio)
        model = mlp(torch.float32)
        opt = EAGER_CASES[optimizer](model)
        for i, (x, y) in enumerate(data(4, dtype=torch.float32)):
            opt.zero_grad()
            parts = (slice(0, 8), slice(8, 16)) if i == 3 else (slice(0, 16),)
            for part in parts:
                with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        logits = model(x[part])
                    loss = nn.functional.cross_entropy(logits.float(), y[part])
                    (loss / len(parts)).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for eager, lazy in zip(*runs, strict=True):
        assert torch.equal(eager, lazy)


class MLPBlock(nn.Module):
    """A transformer's MLP block, checkpointed, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize(
    ("optimizer", "freed"),
    [("adamw", True), ("singd:diagonal", True), ("kfac", True), ("singd:dense", False)],
)
def test_inside_a_checkpointed_segment_inputs_are_not_kept_until_backward(optimizer, freed):
    """On a curvature-update step, the GELU output inside a checkpointed block (the second
    Linear's input) is freed after the forward, as checkpointing means it to be, where
    the statistic is small beside it (diagonal factors; KFAC's 65 x 65 over 1024 rows);
    a dense K over 65 dimensions and 256 rows, larger than 1/8 of the input, keeps it."""
    torch.manual_seed(0)
    model = MLPBlock()
    rows = 256 if optimizer == "singd:dense" else 1024
    opt = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters()),
        "singd:diagonal": EAGER_CASES["singd:diagonal"],
        "singd:dense": EAGER_CASES["singd:dense"],
        "kfac": EAGER_CASES["kfac"],
    }[optimizer](model)
    storages = []
    model.block[1].register_forward_hook(
        lambda module, args, output: storages.append(weakref.ref(output.untyped_storage()))
    )
    for _ in range(2):
        x, y = torch.randn(rows, 16), torch.randint(0, 3, (rows,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        gc.collect()
        assert (storages[-1]() is None) == freed
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["singd:diagonal", "singd:dense", "kfac"])
def test_a_compiled_model_trains_exactly_as_the_eager_one(optimizer):
    """``torch.compile`` (the aot_eager backend: dynamo and AOTAutograd, no code generation)
    of a model SINGD or KFAC hooks: the same parameters to the bit, with the input
    statistic taken in the forward (diagonal, 1024 rows) or in the backward (dense)."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = EAGER_CASES[optimizer](model)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        generator = torch.Generator().manual_seed(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                x, y = torch.randn(1024, 6, generator=generator), torch.randint(0, 3, (1024,))
                opt.zero_grad()
                nn.functional.cross_entropy(forward(x), y).backward()
                opt.step()
        # Dynamo traces the hooks: nothing in them may make it warn.
        assert not [str(w.message) for w in caught if "ynamo" in str(w.message)]
        runs.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*runs, strict=True):
        assert torch.equal(eager, compiled)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("structure", ["diagonal", "dense"])
def test_a_backward_pass_that_builds_a_graph_trains_as_a_plain_one(structure):
    """``backward(create_graph=True)`` (double backward, gradient penalties) runs the
    curvature hooks in grad mode: the terms they keep must carry no graph, and the step
    must be the plain backward's, to the bit."""
    runs = []
    for create_graph in (False, True):
        model = mlp(torch.float32)
        opt = SINGD(model, structures=(structure, structure), **HP)
        for x, y in data(3, dtype=torch.float32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward(create_graph=create_graph)
            kept = [
                t
                for state in opt._factors.values()
                for key in ("H_K", "H_C")
                for t in state[key].tensors().values()
            ]
            assert kept and not any(t.requires_grad for t in kept)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for plain, graph in zip(*runs, strict=True):
        assert torch.equal(plain, graph)
