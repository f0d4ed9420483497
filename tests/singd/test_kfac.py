"""KFAC against dense float64 algebra, its failure handling, checkpoints and overflow."""

import math

import pytest
import torch
from torch import nn

from singd import KFAC
from singd.optim.inverses import INVERSE_METHODS, InversionError

LOW = {torch.float16, torch.bfloat16}


def mlp(dtype=torch.float64, sizes=(6, 5, 3), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])
    ).to(dtype)


def batch(n=8, d_in=6, classes=3, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randint(
        0, classes, (n,), generator=gen
    )


def reference_terms(model: nn.Sequential, x, y):
    """Per linear layer: batch A = E[a a^T], G = B E[g g^T], Grad = [dW | db], in float64.

    Independent of the optimizer's hooks: inputs via forward hooks, output gradients via
    autograd on the retained outputs, for a mean cross-entropy loss.
    """
    model = model.double()
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n in "02"]
    loss = nn.functional.cross_entropy(model(x.double()), y)
    loss.backward()
    for h in handles:
        h.remove()
    terms = {}
    for name in ("0", "2"):
        a = torch.cat([inputs[name], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        gz = outputs[name].grad
        terms[name] = (a.T @ a / len(x), len(x) * gz.T @ gz, gz.T @ a)
    model.zero_grad()
    return terms


def damped_inverse(matrix, damping):
    return torch.linalg.inv(
        matrix + math.sqrt(damping) * torch.eye(len(matrix), dtype=matrix.dtype)
    )


def one_step_update(model, optimizer, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def as_matrices(deltas):
    """[dW0, db0, dW2, db2] -> {"0": [dW0 | db0], "2": [dW2 | db2]}."""
    return {
        "0": torch.cat([deltas[0], deltas[1][:, None]], 1),
        "2": torch.cat([deltas[2], deltas[3][:, None]], 1),
    }


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_update_equals_the_dense_float64_formula(method):
    model, (x, y) = mlp(), batch()
    damping = 1e-2
    reference = reference_terms(mlp(), x, y)
    opt = KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        T=1,
        inverse_method=method,
        inverse_dtype=torch.float64,
    )
    update = as_matrices(one_step_update(model, opt, x, y))
    for name, (A, G, grad) in reference.items():
        expected = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping)
        torch.testing.assert_close(update[name], expected, rtol=1e-9, atol=1e-12)


def test_moving_averages_weight_decay_and_momentum_over_two_steps():
    damping, decay, lr, momentum, wd = 1e-3, 0.7, 0.1, 0.5, 0.01
    model, (x1, y1), (x2, y2) = mlp(), batch(seed=1), batch(seed=2)
    opt = KFAC(
        model,
        lr=lr,
        momentum=momentum,
        damping=damping,
        weight_decay=wd,
        T=1,
        factor_decay=decay,
        inverse_dtype=torch.float64,
    )
    ref_model = mlp()
    params0 = [p.detach().clone() for p in ref_model.parameters()]
    t1 = reference_terms(ref_model, x1, y1)
    one_step_update(model, opt, x1, y1)
    # Reference step 1 from the dense formula, applied to the reference model.
    buffers = {}
    with torch.no_grad():
        for name, (A, G, grad) in t1.items():
            layer = ref_model.get_submodule(name)
            p = torch.cat([layer.weight, layer.bias[:, None]], 1)
            step = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping) + wd * p
            buffers[name] = step
            layer.weight -= lr * step[:, :-1]
            layer.bias -= lr * step[:, -1]
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    t2 = reference_terms(ref_model, x2, y2)
    one_step_update(model, opt, x2, y2)
    with torch.no_grad():
        for name, (A2, G2, grad) in t2.items():
            A1, G1, _ = t1[name]
            A = decay * A1 + (1 - decay) * A2
            G = decay * G1 + (1 - decay) * G2
            layer = ref_model.get_submodule(name)
            p = torch.cat([layer.weight, layer.bias[:, None]], 1)
            step = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping) + wd * p
            buffers[name] = momentum * buffers[name] + step
            layer.weight -= lr * buffers[name][:, :-1]
            layer.bias -= lr * buffers[name][:, -1]
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), params0, strict=True):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_gradient_accumulation_averages_A_and_sums_G():
    damping = 1e-2
    model, (x1, y1), (x2, y2) = mlp(), batch(seed=1), batch(seed=2)
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=damping, T=1, inverse_dtype=torch.float64)
    t1, t2 = reference_terms(mlp(), x1, y1), reference_terms(mlp(), x2, y2)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in ((x1, y1), (x2, y2)):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    update = as_matrices([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
    for name in ("0", "2"):
        A = (t1[name][0] + t2[name][0]) / 2
        G = t1[name][1] + t2[name][1]
        grad = t1[name][2] + t2[name][2]
        expected = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping)
        torch.testing.assert_close(update[name], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_factors_follow_the_float64_formula_within_dtype_tolerance(factor_dtype):
    damping = 1e-2
    model, (x, y) = mlp(torch.float32), batch(dtype=torch.float32)
    reference = reference_terms(mlp(), x, y)
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=damping, T=1, factor_dtype=factor_dtype)
    update = as_matrices(one_step_update(model, opt, x, y))
    eps = torch.finfo(factor_dtype).eps
    for view in opt.curvature_state():
        assert all(f.dtype == factor_dtype for f in view.factors.values())
    for name, (A, G, grad) in reference.items():
        A_d, G_d = (m + math.sqrt(damping) * torch.eye(len(m), dtype=m.dtype) for m in (A, G))
        expected = torch.linalg.inv(G_d) @ grad @ torch.linalg.inv(A_d)
        # First-order perturbation of G^-1 Grad A^-1 when A, G and the products carry
        # rounding of about 2 eps each: kappa(A) + kappa(G) + 1 times it, relative.
        kappa_A, kappa_G = float(torch.linalg.cond(A_d)), float(torch.linalg.cond(G_d))
        tol = 2 * eps * (kappa_A + kappa_G + 1) * expected.abs().max()
        assert (update[name].double() - expected).abs().max() <= tol


def test_curvature_state_shows_the_damped_factors_exactly_as_inverted():
    damping = 0.04
    model, (x, y) = mlp(), batch()
    opt = KFAC(
        model, lr=0.1, damping=damping, T=1, inverse_method="eigh", inverse_dtype=torch.float64
    )
    assert all(not v.factors for v in opt.curvature_state())
    one_step_update(model, opt, x, y)
    reference = reference_terms(mlp(), x, y)
    views = {v.name: v for v in opt.curvature_state()}
    assert set(views) == {"0", "2"}
    for name, (A, G, grad) in reference.items():
        view = views[name]
        assert view.kind == "kfac" and view.damping == {"A": 0.2, "G": 0.2}
        assert view.counters == {"skipped_steps": 0, "failed_decompositions": 0}
        assert view.param_names == (f"{name}.weight", f"{name}.bias")
        torch.testing.assert_close(view.factors["A"], A + 0.2 * torch.eye(len(A), dtype=A.dtype))
        torch.testing.assert_close(view.factors["G"], G + 0.2 * torch.eye(len(G), dtype=G.dtype))
        for key in ("A", "G"):
            product = view.factors[key] @ view.factors[f"{key}_inv"]
            torch.testing.assert_close(product, torch.eye(len(product), dtype=torch.float64))
        torch.testing.assert_close(view.gradient, grad)
        expected = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping)
        torch.testing.assert_close(view.precondition(grad), expected)
        assert view.precondition(grad.float()).dtype == torch.float32


def test_factors_and_inverses_update_only_every_T_steps():
    model = mlp()
    opt = KFAC(model, lr=0.1, T=2)
    inverses = []
    for seed in range(4):
        one_step_update(model, opt, *batch(seed=seed))
        inverses.append(opt.curvature_state()[0].factors["A_inv"].clone())
    assert torch.equal(inverses[0], inverses[1]) and torch.equal(inverses[2], inverses[3])
    assert not torch.equal(inverses[1], inverses[2])


def test_a_failed_inversion_keeps_the_previous_inverse_and_saves_a_reproducer(tmp_path):
    # factor_decay 0: A is the batch estimate. Damping 0 and an input feature that is zero
    # for the whole batch make layer 0's A exactly singular: Cholesky must fail on it.
    # (The last layer's G is singular at damping 0 anyway: cross-entropy output gradients
    # sum to zero over the classes; only layer 0 is checked.)
    model, (x, y) = mlp(), batch()
    opt = KFAC(
        model,
        lr=0.1,
        damping=0.0,
        T=1,
        factor_decay=0.0,
        failure_dir=tmp_path,
        inverse_dtype=torch.float64,
    )
    one_step_update(model, opt, x, y)
    first = opt.curvature_state()[0]
    kept = first.factors["A_inv"].clone()
    assert first.counters["failed_decompositions"] == 0
    assert opt.curvature_state()[1].counters["failed_decompositions"] == 1  # its G
    x_bad = x.clone()
    x_bad[:, 2] = 0.0
    one_step_update(model, opt, x_bad, y)
    view = opt.curvature_state()[0]
    assert view.counters["failed_decompositions"] == 1 and opt.failed_decompositions == 3
    assert torch.equal(view.factors["A_inv"], kept)
    assert view.factors["A"][2].abs().sum() == 0  # the matrix that failed, as shown
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0.A.step1.cholesky.pt",
        "2.G.step0.cholesky.pt",
        "2.G.step1.cholesky.pt",
    ]
    record = torch.load(tmp_path / "0.A.step1.cholesky.pt", weights_only=True)
    assert torch.equal(record["matrix"], view.factors["A"])
    from singd.optim.inverses import replay

    assert "not positive definite" in replay(tmp_path / "0.A.step1.cholesky.pt")[1].reason


def test_a_failure_before_any_inverse_gives_a_plain_gradient_step():
    model, (x, y) = mlp(), batch()
    x[:, 0] = 0.0
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=0.0, T=1, inverse_method="eigh")
    reference = reference_terms(mlp(), x, y)
    update = as_matrices(one_step_update(model, opt, x, y))
    assert opt.curvature_state()[0].counters["failed_decompositions"] == 1
    A, G, grad = reference["0"]
    torch.testing.assert_close(update["0"], torch.linalg.inv(G) @ grad, rtol=1e-6, atol=1e-8)


def test_on_failure_raise_makes_a_failed_inversion_an_error():
    model, (x, y) = mlp(), batch()
    x[:, 0] = 0.0
    opt = KFAC(model, damping=0.0, T=1, on_failure="raise")
    with pytest.raises(InversionError, match="not positive definite"):
        one_step_update(model, opt, x, y)


@pytest.mark.parametrize(("damping_sqrt_ulps", "finite"), [(256, False), (257, True)])
def test_fp16_inverse_overflows_where_the_arithmetic_says(damping_sqrt_ulps, finite):
    # One input feature is zero, so that diagonal entry of A_damped is exactly
    # sqrt(damping) = k * 2^-24 (a float16 subnormal); its inverse 2^24 / k is 65536
    # (beyond 65504, so inf in float16) for k = 256 and 65280.996... (finite) for k = 257.
    model = nn.Linear(2, 1, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    damping = (damping_sqrt_ulps * 2.0**-24) ** 2
    opt = KFAC(model, lr=0.0, damping=damping, T=1, factor_dtype=torch.float16)
    model(x).sum().backward()
    opt.step()
    view = opt.curvature_state()[0]
    assert view.factors["A"][1, 1].item() == damping_sqrt_ulps * 2.0**-24
    entry = view.factors["A_inv"][1, 1].item()
    assert math.isfinite(entry) is finite
    if finite:
        assert entry == pytest.approx(2.0**24 / 257, abs=32)
    assert opt.failed_decompositions == 0  # a cast overflow is stored, not a failure


def test_state_dict_round_trip_with_weights_only(tmp_path):
    model = mlp()
    opt = KFAC(model, lr=0.1, T=2, inverse_method="newton-schulz", damping=1e-2)
    for seed in range(3):
        one_step_update(model, opt, *batch(seed=seed))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    twin = mlp(seed=5)
    twin.load_state_dict(saved["model"])
    twin_opt = KFAC(twin, lr=0.1, T=2, inverse_method="newton-schulz", damping=1e-2)
    twin_opt.load_state_dict(saved["opt"])
    for seed in range(3, 6):
        one_step_update(model, opt, *batch(seed=seed))
        one_step_update(twin, twin_opt, *batch(seed=seed))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(opt.curvature_state(), twin_opt.curvature_state(), strict=True):
        assert a.damping == b.damping and a.counters == b.counters
        for key in ("A", "G", "A_inv", "G_inv"):
            assert torch.equal(a.factors[key], b.factors[key])


def test_state_bytes_counts_factors_and_inverses():
    model = mlp(torch.float32)
    opt = KFAC(model, T=1, factor_dtype=torch.bfloat16)
    one_step_update(model, opt, *batch(dtype=torch.float32))
    # dims: layer 0: d_K = 7, d_C = 5; layer 2: d_K = 6, d_C = 3; 2 bytes per entry.
    entries = 7 * 7 + 5 * 5 + 6 * 6 + 3 * 3
    sizes = opt.state_bytes()
    assert sizes["factors"] == sizes["inverses"] == 2 * entries
    assert sizes["accumulators"] == 0
    assert sizes["param_buffers"] == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inverse_method": "lu"}, "inverse_method must be one of cholesky, eigh, inv, "),
        ({"factor_dtype": torch.int32}, "factor_dtype must be a floating torch dtype"),
        ({"inverse_dtype": torch.float16}, "inverse_dtype must be torch.float32, torch.float64 or"),
        ({"factor_decay": 1.0}, "factor_decay must be a number >= 0 and < 1, got 1.0"),
        ({"damping": -1.0}, "damping must be a number >= 0, got -1.0"),
        ({"on_failure": "ignore"}, "on_failure must be 'keep' or 'raise', got 'ignore'"),
        ({"T": 0}, "T must be a positive integer, got 0"),
    ],
)
def test_bad_hyperparameters_are_one_sentence_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        KFAC(mlp(), **kwargs)


def test_grad_scaler_gives_the_unscaled_update():
    model, twin, (x, y) = mlp(torch.float32), mlp(torch.float32), batch(dtype=torch.float32)
    scale = 2.0**12
    opt = KFAC(model, lr=0.5, damping=1e-2, T=1, init_grad_scale=scale)
    twin_opt = KFAC(twin, lr=0.5, damping=1e-2, T=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    for _ in range(2):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        one_step_update(twin, twin_opt, x, y)
    for a, b in zip(opt.curvature_state(), twin_opt.curvature_state(), strict=True):
        torch.testing.assert_close(a.factors["G"], b.factors["G"], rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_conv2d_factors_are_the_unfolded_patch_and_gradient_moments():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    opt = KFAC(conv, lr=0.0, damping=0.0, T=1, inverse_method="inv")
    out = conv(x)
    out.retain_grad()
    (out.square().mean()).backward()
    opt.step()
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    g = out.grad.flatten(2).transpose(1, 2).reshape(-1, 4) * math.sqrt(5)  # loss_average batch
    view = opt.curvature_state()[0]
    torch.testing.assert_close(view.factors["A"], a.T @ a / len(a))
    torch.testing.assert_close(view.factors["G"], g.T @ g)


def test_autocast_bfloat16_keeps_float32_factors_and_the_update_close_to_float32():
    damping = 1e-2
    model, twin = mlp(torch.float32), mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=damping, T=1)
    twin_opt = KFAC(twin, lr=1.0, momentum=0.0, damping=damping, T=1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    update = as_matrices([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
    expected = as_matrices(one_step_update(twin, twin_opt, x, y))
    for view in opt.curvature_state():
        assert all(f.dtype == torch.float32 for f in view.factors.values())
    eps = torch.finfo(torch.bfloat16).eps
    for view in twin_opt.curvature_state():
        # First-order perturbation of G^-1 Grad A^-1 when a, g and Grad carry bfloat16
        # rounding (about 2 eps each after a product): kappa(A) + kappa(G) + 1 times it.
        kappa_A = float(torch.linalg.cond(view.factors["A"].double()))
        kappa_G = float(torch.linalg.cond(view.factors["G"].double()))
        e = expected[view.name]
        error = (update[view.name] - e).abs().max() / e.abs().max()
        assert error <= 2 * eps * (kappa_A + kappa_G + 1), view.name


def scaled_steps(model, optimizer, batches, scaler):
    for x, y in batches:
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


def test_grad_scaler_with_a_scale_that_doubles_every_step_un_scales_G_exactly():
    batches = [batch(seed=s) for s in range(4)]
    plain, scaled = mlp(), mlp()
    plain_opt = KFAC(plain, lr=0.3, damping=1e-2, T=1, factor_decay=0.5)
    scaled_opt = KFAC(scaled, lr=0.3, damping=1e-2, T=1, factor_decay=0.5, init_grad_scale=4.0)
    for x, y in batches:
        one_step_update(plain, plain_opt, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    scaled_steps(scaled, scaled_opt, batches, scaler)
    assert scaler.get_scale() == 4.0 * 2**4
    for a, b in zip(plain_opt.curvature_state(), scaled_opt.curvature_state(), strict=True):
        torch.testing.assert_close(b.factors["G"], a.factors["G"], rtol=1e-12, atol=1e-14)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_a_step_the_grad_scaler_skips_leaves_factors_and_inverses_alone():
    model = mlp(torch.float32)
    opt = KFAC(model, lr=0.1, T=1, init_grad_scale=2.0**8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled_steps(model, opt, [batch(dtype=torch.float32)], scaler)
    before = {v.name: {k: f.clone() for k, f in v.factors.items()} for v in opt.curvature_state()}
    x, y = batch(dtype=torch.float32, seed=2)
    x[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="skipping this step"):
        scaled_steps(model, opt, [(x, y)], scaler)
    for view in opt.curvature_state():
        assert view.counters == {"skipped_steps": 1, "failed_decompositions": 0}
        for key, factor in view.factors.items():
            assert torch.equal(factor, before[view.name][key]), (view.name, key)
    assert opt.state_bytes()["accumulators"] == 0


def test_parameter_groups_take_their_own_method_damping_and_dtype():
    model = mlp(torch.float32)
    opt = KFAC(
        model,
        [
            {"params": model[0].parameters(), "inverse_method": "eigh", "damping": 0.25},
            {"params": model[2].parameters(), "factor_dtype": torch.bfloat16},
        ],
        lr=0.1,
        T=1,
    )
    one_step_update(model, opt, *batch(dtype=torch.float32))
    first, second = opt.curvature_state()
    assert first.damping == {"A": 0.5, "G": 0.5} and first.factors["A"].dtype == torch.float32
    assert second.damping == {"A": math.sqrt(1e-3), "G": math.sqrt(1e-3)}
    assert all(f.dtype == torch.bfloat16 for f in second.factors.values())
    with pytest.raises(ValueError, match=r"inverse_method \(parameter group 1\) must be one of"):
        groups = [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "inverse_method": "qr"},
        ]
        KFAC(model, groups)


def test_summed_loss_with_loss_average_none_uses_the_unscaled_gradient_factor():
    damping = 1e-2
    model, (x, y) = mlp(), batch()
    reference = reference_terms(mlp(), x, y)  # for the mean loss: G = B gz^T gz
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=damping, T=1, loss_average=None)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    update = as_matrices([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
    n = len(x)
    for name, (A, G_mean, grad_mean) in reference.items():
        # Summed loss: output gradients n times the mean loss's, G = gz^T gz unscaled.
        G, grad = n * G_mean, n * grad_mean
        expected = damped_inverse(G, damping) @ grad @ damped_inverse(A, damping)
        torch.testing.assert_close(update[name], expected, rtol=1e-9, atol=1e-12)


def test_an_overflowed_float16_factor_keeps_failing_and_keeps_the_last_good_inverse():
    model = nn.Linear(3, 2)
    opt = KFAC(model, lr=0.0, damping=1e-2, T=1, factor_dtype=torch.float16)
    small = torch.tensor([[1.0, 0.5, -0.5], [0.2, 1.0, 0.3]])
    huge = torch.tensor([[400.0, 0.0, 0.0], [400.0, 0.0, 0.0]])  # 400^2 = 160000 > 65504
    counts = []
    for x in (small, huge, small, small):
        model(x).sum().backward()  # output gradients of 1: only A sees the huge input
        opt.step()
        opt.zero_grad()
        view = opt.curvature_state()[0]
        counts.append(view.counters["failed_decompositions"])
        if len(counts) == 1:
            good = view.factors["A_inv"].clone()
    assert counts == [0, 1, 2, 3]  # A fails at every update from the overflow on
    assert torch.isinf(view.factors["A"]).any()
    assert torch.equal(view.factors["A_inv"], good)
    assert torch.isfinite(view.factors["G_inv"]).all()
