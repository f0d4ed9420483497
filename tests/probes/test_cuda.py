"""The probes' GPU path: allocator and NVML rows, UUID matching, NaN origins, statistics.

Marked ``cuda``: skipped without a GPU (tests/conftest.py); `scripts/gpu-check.sh` runs
them on a GPU machine.
"""

import importlib.util
import math

import pytest
import torch
from torch import nn

import probes
from probes.device_memory import DEVICE_LABEL, NvmlDevice
from probes.stats import exact_stats, tensor_stats
from singd import SINGD

pytestmark = pytest.mark.cuda

HAS_PYNVML = importlib.util.find_spec("pynvml") is not None


def _train(model, optimizer, steps, x, y, **kwargs):
    with probes.attach(model, optimizer, **kwargs) as session:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            optimizer.step()
    return session


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to("cuda", dtype)


def test_allocator_rows_and_session_peak():
    model = _mlp()
    optimizer = SINGD(model, lr=0.01, T=1, structures=("dense", "diagonal"))
    x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    ballast_bytes = 256 * 2**20
    with probes.attach(model, optimizer, probes=["memory"], every=1) as session:
        for step in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step == 1:
                ballast = torch.ones(ballast_bytes // 4, device="cuda")
                del ballast
    frame = session.to_frame()
    cuda = frame[frame["tensor"] == "cuda"]
    values = cuda.groupby("metric")["value"].max()
    assert values["available"] == 1
    assert 0 < values["allocated_bytes"] <= values["peak_bytes"]
    assert session.summary()["peak_memory_bytes"] >= ballast_bytes
    assert session.summary()["peak_memory_delta_bytes"] is None


def test_nvml_rows_match_what_nvml_can_say():
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    with pytest.warns(UserWarning, match="curvature_state"):
        session = _train(model, optimizer, 2, x, y, probes=["memory"], every=1)
    nvml = session.to_frame().query("tensor == 'nvml'")
    device = NvmlDevice(torch.device("cuda", torch.cuda.current_device()))
    if not HAS_PYNVML or device.handle is None:
        assert (nvml.query("metric == 'available'")["value"] == 0).all()
        return
    used = nvml.query("metric == 'device_used_bytes'")
    assert (used["module"] == DEVICE_LABEL).all()
    # NVML's figure includes the CUDA context, so it exceeds what the allocator holds.
    assert (used["value"] > torch.cuda.memory_allocated()).all()
    import pynvml

    uuid = pynvml.nvmlDeviceGetUUID(device.handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    torch_uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    assert torch_uuid.lower().removeprefix("gpu-") in uuid.lower()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_first_nonfinite_on_the_gpu(dtype):
    model = _mlp(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 32, device="cuda", dtype=dtype)
    y = torch.randint(0, 10, (64,), device="cuda")

    def poison(module, args, output):
        if state["step"] == 4:
            output = output.clone()
            output[0, 0] = math.nan
            return output
        return None

    state = {"step": 0}
    # On the Linear layer (ReLU is watched only in full iterations: it cannot make a NaN).
    handle = model[0].register_forward_hook(poison)
    with probes.attach(model, optimizer, every=1000) as session:
        for step in range(6):
            state["step"] = step
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            optimizer.step()
    handle.remove()
    first = session.first_nonfinite()
    assert (first.step, first.module, first.tensor, first.phase) == (
        4,
        "0",
        "activation",
        "forward",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_statistics_on_the_gpu_equal_the_cpu(dtype):
    x = torch.randn(300, 7, dtype=torch.float64) * 1e-5
    x[0, 0], x[1, 1] = math.inf, math.nan
    x = x.to(dtype)
    for run in (torch.float16, torch.bfloat16):
        cpu = exact_stats(x, run)
        assert tensor_stats(x.cuda(), run) == pytest.approx(cpu, nan_ok=True)
        assert exact_stats(x.cuda(), run) == pytest.approx(cpu, nan_ok=True)


def test_mixed_precision_training_with_every_probe():
    model = _mlp()
    optimizer = SINGD(model, lr=0.01, T=1, structures=("diagonal", "diagonal"))
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    with probes.attach(model, optimizer, every=2, dtype="fp16") as session:
        for _ in range(6):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    frame = session.to_frame()
    assert set(frame["probe"]) == {"condition", "numerics", "memory", "time"}
    assert session.summary()["nan_events"] == 0
    # Autocast activations are float16, the master weights float32.
    dtypes = frame.query("probe == 'numerics'").groupby("tensor")["dtype"].first()
    assert dtypes["activation"] == "float16" and dtypes["weight"] == "float32"


def test_tensor_peak_on_cuda_is_the_allocators_peak_above_what_lived_before():
    """On CUDA `TensorPeak` reads the allocator: a known 8 MiB block made and freed inside
    the stretch is its peak (up to the allocator's 512 B rounding), and the blocks alive
    before it (the ballast) are not counted."""
    from probes.tensor_memory import TensorPeak

    ballast = torch.empty(4 * 2**20, device="cuda", dtype=torch.uint8)
    with TensorPeak("cuda") as meter:
        block = torch.empty(8 * 2**20, device="cuda", dtype=torch.uint8)
        del block
    assert 8 * 2**20 <= meter.peak_bytes < 8 * 2**20 + 2**20
    assert meter.live_bytes == 0
    del ballast
