"""The session's life cycle, records, Parquet output, memory accounting and input checks."""

import math
import warnings

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import probes
from probes.memory import adamw_state_bytes
from probes.records import COLUMNS, SCHEMA_VERSION, read_parquet
from singd import SINGD
from tests.optimizers import factory


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).to(dtype)


def _steps(model, optimizer, n, dtype=torch.float32):
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()


def _hook_count(model, optimizer) -> int:
    per_module = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    return (
        per_module
        + len(optimizer._optimizer_step_pre_hooks)
        + len(optimizer._optimizer_step_post_hooks)
    )


OPTIMIZERS = {
    "sgd": factory("sgd", lr=0.01, momentum=0.9),
    "adamw": factory("adamw", lr=0.01),
    "singd": factory("singd:diagonal/dense", lr=0.01, T=1),
    "kfac": factory("kfac", lr=0.01, T=1),
}


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_detach_removes_every_hook_and_twice_is_harmless(family):
    model = _mlp()
    optimizer = OPTIMIZERS[family](model)
    before = _hook_count(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = probes.attach(model, optimizer)
    assert _hook_count(model, optimizer) > before
    _steps(model, optimizer, 2)
    session.detach()
    assert _hook_count(model, optimizer) == before
    session.detach()
    rows = len(session.to_frame())
    _steps(model, optimizer, 2)
    assert len(session.to_frame()) == rows, "a detached session records nothing"


def test_hooks_are_removed_when_the_loop_raises():
    model = _mlp()
    optimizer = OPTIMIZERS["adamw"](model)
    before = _hook_count(model, optimizer)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with probes.attach(model, optimizer):
            _steps(model, optimizer, 1)
            raise RuntimeError("boom")
    assert _hook_count(model, optimizer) == before


def test_plain_optimizer_warns_once_that_factor_probes_have_nothing_to_read():
    model = _mlp()
    optimizer = OPTIMIZERS["adamw"](model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probes.attach(model, optimizer, every=1):
            _steps(model, optimizer, 5)
    messages = [str(w.message) for w in caught if "curvature_state" in str(w.message)]
    assert len(messages) == 1 and "AdamW" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probes.attach(model, optimizer, probes=["numerics"]):
            _steps(model, optimizer, 1)
    assert not caught, "without the condition probe there is nothing to warn about"


def test_records_columns_cadences_and_parquet_round_trip(tmp_path):
    model = _mlp()
    optimizer = OPTIMIZERS["singd"](model)
    with probes.attach(model, optimizer, every=4, run="r1", dtype="bf16") as session:
        _steps(model, optimizer, 9)
    frame = session.to_frame()
    assert tuple(frame.columns) == COLUMNS
    assert set(frame["probe"]) == {"condition", "numerics", "memory", "time"}
    assert set(frame["step"].unique()) == {0, 4, 8}
    assert (frame["run"] == "r1").all() and (frame["rank"] == 0).all()
    numerics = frame[frame["probe"] == "numerics"]
    assert set(numerics["tensor"]) >= {
        "activation",
        "output_grad",
        "weight",
        "grad",
        "update",
        "momentum",
        "K",
        "C",
    }
    assert set(numerics["phase"]) == {"forward", "backward", "step"}
    path = session.save(tmp_path / "records.parquet")
    meta = pq.read_schema(path).metadata
    assert meta[b"precision_lab.schema"] == str(SCHEMA_VERSION).encode()
    back = read_parquet(path)
    pd.testing.assert_frame_equal(back, frame)
    # Exact: the float64 bits survive (no rounding anywhere on the way).
    assert (back["value"].to_numpy().view("u8") == frame["value"].to_numpy().view("u8")).all()


def test_every_none_uses_each_probes_default_cadence():
    model = _mlp()
    optimizer = OPTIMIZERS["singd"](model)
    with probes.attach(model, optimizer) as session:
        _steps(model, optimizer, 3)
    assert session.every == probes.DEFAULT_EVERY
    frame = session.to_frame()
    steps = frame.groupby("probe")["step"].unique()
    assert list(steps["condition"]) == [0] and list(steps["time"]) == [0, 1, 2]


def test_a_resumed_session_follows_the_trainings_step_count():
    """start_step numbers the records and aligns the cadences with the training's steps."""
    model = _mlp()
    optimizer = OPTIMIZERS["singd"](model)
    with probes.attach(model, optimizer, start_step=998) as session:  # default cadences
        _steps(model, optimizer, 5)
        optimizer.param_groups[0]["lr"] = math.nan
        _steps(model, optimizer, 1)
    frame = session.to_frame()
    steps = frame.groupby("probe")["step"].unique()
    assert list(steps["time"]) == [998, 999, 1000, 1001, 1002, 1003]
    assert list(steps["condition"]) == [1000] and list(steps["memory"]) == [1000]
    assert list(steps["numerics"]) == [1000, 1003]  # full readings; the NaN's origin
    assert session.first_nonfinite().step == 1003
    assert session.summary()["steps"] == 6 and session.summary()["first_nonfinite_step"] == 1003


def test_update_rows_equal_the_parameter_change():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[0].weight.detach().clone()
    with probes.attach(model, optimizer, probes=["numerics"], every=1) as session:
        _steps(model, optimizer, 1)
    delta = (model[0].weight.detach() - before).abs()
    rows = session.to_frame().query("tensor == 'update' and module == '0.weight'")
    values = dict(zip(rows["metric"], rows["value"], strict=True))
    assert values["amax"] == pytest.approx(float(delta.max()))
    assert values["min_nonzero"] == pytest.approx(float(delta[delta > 0].min()))


@pytest.mark.parametrize("family", ["singd", "kfac"])
def test_memory_bytes_agree_with_the_optimizers_state_bytes(family):
    model = _mlp()
    optimizer = OPTIMIZERS[family](model)
    with probes.attach(model, optimizer, probes=["memory"], every=1) as session:
        _steps(model, optimizer, 3)
    frame = session.to_frame()
    last = frame[(frame["step"] == 2) & (frame["metric"] == "bytes")]
    categories = optimizer.state_bytes()
    by_tensor = dict(zip(last["tensor"], last["value"], strict=False))
    assert {k: by_tensor[k] for k in categories} == {k: float(v) for k, v in categories.items()}
    assert by_tensor["total"] == sum(categories.values())
    assert session.summary()["optimizer_state_bytes"] == sum(categories.values())
    # Independent accounting: per-factor rows and per-parameter state rows.
    per_factor = last[last["tensor"].isin(["K", "C", "m_K", "m_C", "A", "G", "A_inv", "G_inv"])]
    per_param = last[last["module"].str.contains("weight|bias", regex=True)]
    if family == "singd":
        want = categories["factors"] + categories["momenta"]
    else:
        # KFAC's A and G rows are the damped copies, the same size as the stored factors.
        want = categories["factors"] + categories["inverses"]
    assert per_factor["value"].sum() == want
    assert per_param["value"].sum() == categories["param_buffers"]


def test_adamw_estimate_equals_adamw_actual_state():
    model = _mlp(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with probes.attach(model, optimizer, probes=["memory"], every=1) as session:
        _steps(model, optimizer, 1, torch.bfloat16)
    frame = session.to_frame()
    actual = frame.query("tensor == 'total' and metric == 'bytes'")["value"].iloc[-1]
    estimate = frame.query("metric == 'adamw_state_bytes'")["value"].iloc[-1]
    assert actual == estimate == adamw_state_bytes(model.parameters())


def test_device_memory_says_not_available_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/probes/test_cuda.py covers it")
    model = _mlp()
    optimizer = OPTIMIZERS["sgd"](model)
    with probes.attach(model, optimizer, probes=["memory"]) as session:
        _steps(model, optimizer, 1)
    frame = session.to_frame()
    available = frame[frame["metric"] == "available"]
    assert set(available["tensor"]) == {"cuda", "nvml"}
    assert (available["value"] == 0).all()
    assert set(frame[frame["tensor"] == "nvml"]["metric"]) == {"available"}


def test_process_memory_and_per_session_peak():
    model = _mlp()
    optimizer = OPTIMIZERS["sgd"](model)
    big = 64 * 2**20
    with probes.attach(model, optimizer, probes=["memory"], every=1) as first:
        _steps(model, optimizer, 1)
        ballast = torch.ones(big // 4)  # touched pages: resident
        _steps(model, optimizer, 1)
        del ballast
    with probes.attach(model, optimizer, probes=["memory"], every=1) as second:
        _steps(model, optimizer, 2)
    peak1, peak2 = first.summary()["peak_memory_bytes"], second.summary()["peak_memory_bytes"]
    assert first.summary()["peak_memory_delta_bytes"] >= 0.9 * big
    # The second session's peak was reset: it did not inherit the ballast.
    assert peak2 < peak1 - 0.5 * big
    rss = first.to_frame().query("metric == 'rss_bytes'")["value"]
    assert rss.iloc[1] > rss.iloc[0] + 0.9 * big


def test_summary_fields_and_time_shares():
    model = _mlp()
    optimizer = OPTIMIZERS["singd"](model)
    with probes.attach(model, optimizer, every=1) as session:
        _steps(model, optimizer, 6)
    summary = session.summary()
    assert summary["steps"] == 6 and summary["nan_events"] == 0
    assert summary["first_nonfinite_step"] is None
    assert 0 < summary["probe_overhead_fraction"] < 1
    assert summary["step_time_ms"] > 0
    assert summary["underflow_fraction"] is not None and summary["max_condition"] >= 1
    time_rows = session.to_frame().query("probe == 'time'")
    per_step = time_rows.pivot(index="step", columns="metric", values="value")
    assert (per_step["optimizer_time_ms"] < per_step["step_time_ms"]).all()
    assert (per_step["probe_time_ms"] < per_step["step_time_ms"]).all()
    assert summary["step_time_ms"] == pytest.approx(per_step["step_time_ms"].median())


@pytest.mark.parametrize("family", ["singd", "kfac"])
def test_summary_aggregates_equal_what_the_records_say(family):
    """The summary keeps running figures; they are exactly the records' extremes."""
    model = _mlp()
    optimizer = OPTIMIZERS[family](model)
    with probes.attach(model, optimizer, every=2) as session:
        _steps(model, optimizer, 5)
    summary, frame = session.summary(), session.to_frame()
    cond = frame.query("probe == 'condition' and metric == 'condition_number'")["value"]
    under = frame.query("probe == 'numerics' and metric == 'underflow_fraction'")["value"]
    assert summary["max_condition"] == cond.max() and summary["underflow_fraction"] == under.max()
    memory = frame.query("probe == 'memory' and metric == 'bytes' and tensor == 'total'")
    assert summary["optimizer_state_bytes"] == memory["value"].iloc[-1]


def test_probes_never_modify_training():
    torch.manual_seed(1)
    reference, probed = _mlp(), _mlp()
    opt_ref = SINGD(reference, lr=0.05, T=1, structures=("dense", "diagonal"))
    opt_probed = SINGD(probed, lr=0.05, T=1, structures=("dense", "diagonal"))
    torch.manual_seed(2)
    _steps(reference, opt_ref, 4)
    torch.manual_seed(2)
    with probes.attach(probed, opt_probed, every=1):
        _steps(probed, opt_probed, 4)
    for a, b in zip(reference.parameters(), probed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probes": ["numerics", "nans"]}, "unknown probe 'nans'; the probes are condition"),
        ({"every": 0}, "every must be a positive integer or None, got 0"),
        ({"every": 2.5}, "every must be a positive integer or None, got 2.5"),
        ({"dtype": "fp8"}, "dtype 'fp8' is not a floating dtype"),
        ({"start_step": -1}, "start_step must be a non-negative integer, got -1"),
        ({"start_step": 1.0}, "start_step must be a non-negative integer, got 1.0"),
    ],
)
def test_bad_arguments_get_one_clear_sentence(kwargs, message):
    model = _mlp()
    with pytest.raises(ValueError, match=message):
        probes.attach(model, OPTIMIZERS["sgd"](model), **kwargs)


def test_first_nonfinite_rows_are_nan_free_values():
    model = _mlp()
    optimizer = OPTIMIZERS["sgd"](model)
    with probes.attach(model, optimizer, probes=["time"]) as session:
        _steps(model, optimizer, 2)
    assert session.first_nonfinite() is None
    assert not session.to_frame()["value"].map(math.isnan).any()


def test_sparse_gradients_and_float8_are_left_out_not_fatal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(18, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 20, (8, 3)), torch.randint(0, 3, (8,))
    with probes.attach(model, optimizer, every=1) as session:
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        optimizer.param_groups[0]["lr"] = math.nan  # the pinpoint path reads the gradients
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    grads = session.to_frame().query("tensor == 'grad'")
    assert set(grads["module"]) == {"2.weight", "2.bias"}  # the sparse one is left out
    assert session.first_nonfinite() == probes.NonFinite(2, "0.weight", "update", "step")
    flags = probes.flags.StepFlags(torch.bfloat16)
    flags.add(("m", "t", ""), torch.zeros(3).to(torch.float8_e4m3fn))
    assert len(flags) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_readings_are_exact_amax_and_never_miss_nonfinite(dtype):
    """Readings are max(|min|, |max|); float64 has limits too (its cast bound is inf)."""
    flags = probes.flags.StepFlags(dtype)
    huge = torch.tensor([1.0, -0.75, 0.5], dtype=dtype) * torch.finfo(dtype).max
    flags.add(("m", "huge", ""), huge)  # finite, past the overflow threshold
    flags.add(("m", "small", ""), torch.tensor([3.0, -4.0], dtype=dtype))
    flags.add(("m", "nan", ""), torch.tensor([1.0, math.nan, -math.inf], dtype=dtype))
    flags.add(("m", "inf", ""), torch.tensor([1.0, -math.inf], dtype=dtype))
    flags.add(("m", "strided", ""), torch.tensor([[1.0, math.inf], [2.0, 3.0]], dtype=dtype).t())
    values = flags.values()
    assert values[0] == huge[0].item() and values[1] == 4.0
    assert math.isnan(values[2]) and values[3] == math.inf and values[4] == math.inf
    assert flags.nonfinite() == [2, 3, 4]
    assert flags.overflow()
    flags.reset()
    flags.add(("m", "small", ""), torch.tensor([3.0, -4.0], dtype=dtype, requires_grad=True))
    assert flags.nonfinite() == [] and not flags.overflow() and flags.values() == [4.0]
