"""SINGD's batched diagonal step (`singd.optim.foreach`) against the per-layer path: the
parameters, momentum buffers and factors are bitwise equal after several steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim import foreach
from tests.training import finish_step

CASES = {
    "plain": {},
    "weight_decay": {"weight_decay": 1e-2},
    "no_momentum": {"momentum": 0.0},
    "no_bias": {"bias": False},
    "grad_scaler": {"scaler": True},
    "bf16": {"dtype": torch.bfloat16},
    "bf16_float32_factors": {
        "dtype": torch.bfloat16,
        "preconditioner_dtype": (torch.float32, torch.float32),
    },
    "accumulation": {"passes": 2},
    "conv": {"conv": True},
    "all": {"weight_decay": 1e-2, "scaler": True, "passes": 2, "bias": False},
    "kfac_like": {"kfac_like": True},
    "normalize_lr_cov": {"normalize_lr_cov": True, "lr_cov": 1.0},
    "no_riemannian_momentum": {"alpha1": 0.0},
    "lr_cov_schedule": {"lr_cov": lambda step: 0.1 / (1 + step)},
    "summed_loss": {"loss_average": None},
    "float64": {"dtype": torch.float64},
    "float32_K_bf16_C": {"preconditioner_dtype": (torch.float32, torch.bfloat16)},
    # Factors of hundreds of entries at odd offsets: the batched path works on them
    # concatenated, where a vectorised kernel's main loop and tail fall elsewhere.
    "wide": {"widths": (300, 257, 41)},
    "wide_normalize_lr_cov": {"widths": (300, 257, 41), "normalize_lr_cov": True},
}


def _train(case: dict, T: int, batched: bool, steps: int = 5):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    bias = case.pop("bias", True)
    scaler_on = case.pop("scaler", False)
    passes = case.pop("passes", 1)
    conv = case.pop("conv", False)
    widths = case.pop("widths", (6, 7, 5))
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=bias),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 5, bias=bias),
        )
        x = torch.randn(8, 3, 6, 6)
    else:
        model = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=bias),
            nn.ReLU(),
            nn.Linear(widths[1], widths[2], bias=bias),
            nn.Linear(widths[2], 3),
        )
        x = torch.randn(8, widths[0])
    model = model.to(dtype)
    x = x.to(dtype)
    y = torch.randint(0, 3, (8,))
    kwargs = {"lr": 0.05, "momentum": 0.9, "lr_cov": 0.1, **case}
    if scaler_on:
        kwargs["init_grad_scale"] = 2.0**4
    with warnings.catch_warnings():  # kfac_like sets alpha1 to 0, with a warning
        warnings.simplefilter("ignore", UserWarning)
        optimizer = SINGD(model, structures=("diagonal", "diagonal"), T=T, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaler_on else None
    previous = foreach.ENABLED
    foreach.ENABLED = batched
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            for part in range(passes):
                rows = slice(part * 8 // passes, (part + 1) * 8 // passes)
                out = model(x[rows]).float()
                loss = nn.functional.cross_entropy(out, y[rows]) / passes
                (scaler.scale(loss) if scaler else loss).backward()
            finish_step(optimizer, scaler)
    finally:
        foreach.ENABLED = previous
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]
    for state in optimizer._factors.values():
        for key in ("K", "C", "m_K", "m_C"):
            if key in state:
                tensors += list(state[key].tensors().values())
    return tensors


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_batched_step_is_bitwise_the_per_layer_step(name, T, monkeypatch):
    calls = []  # one entry per step that took the batched path (every layer in one call)
    original = foreach.applies
    monkeypatch.setattr(foreach, "applies", lambda *a: original(*a) and not calls.append(1))
    batched = _train(CASES[name], T, batched=True)
    assert calls, "the batched path was not taken"
    calls.clear()
    general = _train(CASES[name], T, batched=False)
    assert not calls
    assert len(batched) == len(general)
    for a, b in zip(batched, general, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_not_taken_with_one_dense_factor_or_two_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    mixed = SINGD(
        model,
        params=[
            {"params": model[0].parameters(), "structures": ("dense", "diagonal")},
            {"params": model[1].parameters()},
        ],
        structures=("diagonal", "diagonal"),
    )
    assert not foreach.applies(mixed, mixed._layers)
    one = SINGD(nn.Sequential(nn.Linear(4, 3)), structures=("diagonal", "diagonal"))
    assert foreach.applies(one, one._layers)
    auto = SINGD(
        nn.Sequential(nn.Linear(4, 3)), structures=("diagonal", "diagonal"), precision="auto"
    )
    assert not foreach.applies(auto, auto._layers)
