"""The what-if probe (probes.whatif) against a slow float64 reference, and in a session."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import probes
from probes.whatif import WHATIF_DTYPES, whatif
from singd import KFAC


def reference(values: list[float], current: torch.dtype, dtype: torch.dtype) -> dict:
    """Element by element in float64, as the module doc defines each figure."""
    info = torch.finfo(dtype)
    nonzero = [v for v in values if v != 0 and math.isfinite(v)]
    under = sum(abs(v) < info.tiny for v in nonzero)
    over = [v for v in nonzero if abs(v) > info.max]
    kept = [v for v in nonzero if abs(v) <= info.max]
    cast = [torch.tensor(v, dtype=torch.float64).to(dtype).double().item() for v in kept]
    err = math.sqrt(sum((c - v) ** 2 for c, v in zip(cast, kept, strict=True)))
    norm = math.sqrt(sum(v * v for v in kept))
    size = torch.empty((), dtype=current).element_size()
    narrow = torch.empty((), dtype=dtype).element_size()
    return {
        "underflow_fraction": under / len(nonzero),
        "overflow_fraction": len(over) / len(nonzero),
        "rounding_error": err / norm if norm else float("nan"),
        "bytes_saved": float(len(values) * (size - narrow)),
    }


# Known answers: float16's smallest normal is 2^-14, largest finite 65504; e4m3fn's 2^-6
# and 448; e5m2's 2^-14 and 57344; bfloat16's 2^-126 and about 3.4e38.
HAND_MADE = [0.0, 1.0, 0.5, 3.0, 1e-5, 2e-3, 1000.0, 7e4, -6e4, 1e-30, float("inf"), 1 / 3]


@pytest.mark.parametrize("dtype", WHATIF_DTYPES, ids=str)
@pytest.mark.parametrize("current", [torch.float32, torch.float64])
def test_whatif_matches_float64_reference(dtype, current):
    x = torch.tensor(HAND_MADE, dtype=current)
    values = x.tolist()
    found, expected = whatif(x, dtype), reference(values, current, dtype)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_whatif_known_answers():
    x = torch.tensor(HAND_MADE)  # 10 finite nonzero entries
    fp16 = whatif(x, torch.float16)
    assert fp16["underflow_fraction"] == 2 / 10  # 1e-5 (subnormal) and 1e-30 (zero)
    assert fp16["overflow_fraction"] == 1 / 10  # 7e4
    e4m3 = whatif(x, torch.float8_e4m3fn)
    assert e4m3["underflow_fraction"] == 3 / 10  # 1e-5, 2e-3, 1e-30 below 2^-6
    assert e4m3["overflow_fraction"] == 3 / 10  # 1000, 7e4, -6e4 above 448
    assert whatif(x, torch.bfloat16)["overflow_fraction"] == 0.0
    exact = whatif(torch.tensor([1.0, 0.5, -2.0]), torch.float8_e5m2)
    assert exact["rounding_error"] == 0.0 and exact["bytes_saved"] == 3 * 3
    assert whatif(torch.zeros(4), torch.float16)["underflow_fraction"] == 0.0


def test_session_records_whatif_and_precision_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    x, y = torch.randn(64, 10) * 30.0, torch.randint(3, (64,))
    optimizer = KFAC(
        model, lr=0.05, T=1, damping=1e-10, factor_dtype=torch.float16, precision="auto"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = probes.attach(model, optimizer, probes=["whatif"], every=2)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        session.detach()
    rows = session.to_frame()
    whatif_rows = rows[rows.probe == "whatif"]
    assert set(whatif_rows.step) == {0, 2}
    considered = whatif_rows[whatif_rows.metric != "stored_bytes"]
    assert set(considered.dtype) == {"float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
    assert {"A", "G", "A_inv", "G_inv", "momentum_buffer"} <= set(whatif_rows.tensor)
    # stored_bytes: each tensor's own dtype and size, as the last step left it.
    stored_rows = whatif_rows[whatif_rows.metric == "stored_bytes"]
    # Step 0 promoted the factors from float16: the rows of step 0 show them wider.
    first = stored_rows[stored_rows.step == 0].set_index(["module", "tensor"])["dtype"]
    assert {first[e.layer, e.factor] for e in optimizer.precision_events} == {"float32"}
    stored = stored_rows[stored_rows.step == 2]
    factors = {layer.name: layer.factors for layer in optimizer.curvature_state()}
    for row in stored[stored.tensor.isin(["A", "G", "A_inv", "G_inv"])].itertuples():
        factor = factors[row.module][row.tensor]
        assert row.dtype == str(factor.dtype).removeprefix("torch.")
        assert row.value == factor.numel() * factor.element_size()
    events = optimizer.precision_events
    precision = rows[rows.probe == "precision"]
    assert len(precision) == len(events) > 0
    first = precision.iloc[0]
    assert tuple(first[["step", "module", "tensor", "dtype", "metric"]]) == (
        events[0].step,
        events[0].layer,
        events[0].factor,
        events[0].to_dtype,
        events[0].metric,
    )


def test_whatif_is_off_by_default():
    model = nn.Linear(3, 2)
    session = probes.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "whatif" not in session.probes
    session.detach()


def test_whatif_cadence_is_read_when_readings_wait_on_the_device():
    # With read_every_step=False an iteration where no cadence is due closes without
    # reading anything; a due whatif cadence must still close it the full way.
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with probes.attach(
        model, optimizer, probes=["whatif", "time"], every=2, read_every_step=False
    ) as session:
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
    rows = session.to_frame()
    assert set(rows[rows.probe == "whatif"].step) == {0, 2}
