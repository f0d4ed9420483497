"""Numerics statistics against numpy references and hand-computed dtype limits."""

import math

import numpy as np
import pytest
import torch

from probes.limits import limits, parse_dtype
from probes.stats import STAT_METRICS, exact_stats, tensor_stats

LOW = [torch.float16, torch.bfloat16]


def _stats(x: torch.Tensor, run: torch.dtype) -> dict[str, float]:
    """The shortcut statistics, checked against the always-counting ones on the way."""
    fast = tensor_stats(x, run)
    exact = exact_stats(x, run)
    assert fast == pytest.approx(exact, rel=0, abs=0, nan_ok=True)
    return dict(zip(STAT_METRICS, fast, strict=True))


ALL = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(
    ("dtype", "wider"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_cast_overflow_threshold_is_where_casting_rounds_to_infinity(dtype, wider):
    # From the next wider dtype, as in training (float64 -> float16 on the CPU rounds
    # twice, through float32, and is not the cast being modelled).
    threshold = limits(dtype).cast_overflow
    at = torch.tensor([threshold], dtype=wider)
    below = torch.nextafter(at, torch.zeros(1, dtype=wider))
    assert torch.isinf(at.to(dtype)).all()
    assert torch.isfinite(below.to(dtype)).all()


def test_cast_overflow_threshold_hand_values():
    assert limits(torch.float16).cast_overflow == 65520.0
    assert limits(torch.bfloat16).cast_overflow == 2.0**128 - 2.0**119


def test_parse_dtype_names_and_refusal():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="'fp8'.*fp32, fp16, bf16"):
        parse_dtype("fp8")


def _reference(x64: np.ndarray, own: torch.dtype, run: torch.dtype) -> dict[str, float]:
    """Straightforward numpy statistics of values that are exactly representable in ``own``."""
    own_info, run_info = torch.finfo(own), torch.finfo(run)
    finite = x64[np.isfinite(x64)]
    mag = np.abs(finite)
    nonzero = mag[mag > 0]
    cast = torch.from_numpy(nonzero).to(run).to(torch.float64).abs().numpy()
    cast_all = torch.from_numpy(mag).to(run).to(torch.float64).numpy()
    n = max(len(nonzero), 1)
    return {
        "nan_count": float(np.isnan(x64).sum()),
        "posinf_count": float(np.isposinf(x64).sum()),
        "neginf_count": float(np.isneginf(x64).sum()),
        "overflow_risk_fraction": float((mag > own_info.max / 2).sum() / x64.size),
        "subnormal_fraction": float((nonzero < own_info.tiny).sum() / n),
        "underflow_fraction": float((cast < run_info.tiny).sum() / n),
        "cast_overflow_count": float(np.isinf(cast_all).sum()),
        "amax": float(mag.max()) if mag.size else 0.0,
        "min_nonzero": float(nonzero.min()) if nonzero.size else math.nan,
    }


def _mixed_values(dtype: torch.dtype, n: int = 4000) -> torch.Tensor:
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(1)
    # Log-uniform magnitudes across the whole range, then specials and boundary values.
    exps = torch.empty(n, dtype=torch.float64).uniform_(
        math.log2(info.tiny) - 12, math.log2(info.max), generator=gen
    )
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    x = (signs * torch.exp2(exps)).to(dtype)
    specials = torch.tensor(
        [0.0, -0.0, math.nan, math.inf, -math.inf, math.inf, info.max, -info.max, info.tiny],
        dtype=dtype,
    )
    return torch.cat([x, specials])


@pytest.mark.parametrize("own", ALL)
@pytest.mark.parametrize("run", LOW)
def test_stats_match_numpy_reference(own, run):
    x = _mixed_values(own)
    got = _stats(x, run)
    want = _reference(x.to(torch.float64).numpy(), own, run)
    for metric in STAT_METRICS:
        assert got[metric] == pytest.approx(want[metric], rel=1e-12, nan_ok=True), metric
    # The sample really exercises the interesting cases, so the test can fail.
    assert want["subnormal_fraction"] > 0 and want["nan_count"] == 1 and want["posinf_count"] == 2
    if own == torch.float32 and run == torch.float16:
        assert want["underflow_fraction"] > want["subnormal_fraction"]
        assert want["cast_overflow_count"] > 0


def test_subnormal_and_flush_fractions_by_hand_fp16():
    info = torch.finfo(torch.float16)
    smallest_sub = 2.0**-24
    # float32 values: one normal fp16 value, one fp16 subnormal, one that flushes to zero
    # (below half the smallest subnormal), one just below tiny that stays subnormal.
    x = torch.tensor([1.0, 3 * smallest_sub, smallest_sub / 4, info.tiny * 0.75])
    stats = _stats(x, torch.float16)
    assert stats["subnormal_fraction"] == 0.0  # all normal in float32
    assert stats["underflow_fraction"] == pytest.approx(3 / 4)
    assert stats["min_nonzero"] == pytest.approx(smallest_sub / 4)
    # In fp16 itself: 3 * 2^-24 and 0.75 tiny are subnormal; 2^-26 is already zero.
    y = x.to(torch.float16)
    stats16 = _stats(y, torch.float16)
    assert stats16["subnormal_fraction"] == pytest.approx(2 / 3)
    assert stats16["underflow_fraction"] == stats16["subnormal_fraction"]


def test_subnormal_fraction_by_hand_bf16():
    tiny = torch.finfo(torch.bfloat16).tiny
    x = torch.tensor([tiny, tiny / 2, tiny / 128, 2.0**-140, 1.0, 0.0], dtype=torch.float32)
    stats = _stats(x, torch.bfloat16)
    # tiny/2 and tiny/128 = 2^-133 are bf16 subnormals (smallest 2^-133); 2^-140 flushes.
    assert stats["underflow_fraction"] == pytest.approx(3 / 5)
    # float32 shares bfloat16's exponent range: the same three are float32 subnormals.
    assert stats["subnormal_fraction"] == pytest.approx(3 / 5)
    assert stats["cast_overflow_count"] == 0.0
    cast = _stats(x.to(torch.bfloat16), torch.bfloat16)
    assert cast["subnormal_fraction"] == pytest.approx(2 / 4)  # 2^-140 became zero


def test_empty_and_all_nonfinite_tensors():
    empty = _stats(torch.empty(0), torch.float16)
    assert empty["amax"] == 0.0 and math.isnan(empty["min_nonzero"])
    bad = torch.tensor([math.nan, math.inf])
    stats = _stats(bad, torch.float16)
    assert stats["nan_count"] == 1 and stats["posinf_count"] == 1 and stats["amax"] == 0.0
    assert stats["cast_overflow_count"] == 0  # an infinity is not a finite value that overflows


def test_stats_do_not_modify_the_tensor():
    x = _mixed_values(torch.float16)
    before = x.clone()
    tensor_stats(x, torch.bfloat16)
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))


def _cases(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 7, generator=gen)
    big = x.clone()
    big[5, 3] = torch.finfo(dtype).max * 0.75
    return {
        "healthy": x,
        "relu_zeros": x.clamp(min=0),
        "all_zero": torch.zeros(9),
        "tiny_values": x * 1e-6,  # below float16's tiny, normal in float32/bfloat16
        "one_overflow_risk": big,
        "cast_overflow": x * 7e4,  # beyond float16's range, fine in bfloat16
    }


@pytest.mark.parametrize("own", ALL)
@pytest.mark.parametrize("run", LOW)
@pytest.mark.parametrize(
    "case",
    ["healthy", "relu_zeros", "all_zero", "tiny_values", "one_overflow_risk", "cast_overflow"],
)
def test_shortcut_equals_counting_and_numpy(own, run, case):
    x = _cases(own)[case].to(own)
    got = _stats(x, run)  # asserts tensor_stats == exact_stats bit for bit
    want = _reference(x.to(torch.float64).numpy(), own, run)
    for metric in STAT_METRICS:
        assert got[metric] == pytest.approx(want[metric], rel=1e-12, nan_ok=True), metric
