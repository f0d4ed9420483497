#!/usr/bin/env bash
# One short run that checks the whole GPU path (about 2 minutes, at most 6):
#   1. every CUDA-marked test of tests/probes and tests/singd (allocator and NVML rows,
#      UUID matching, NaN origins and statistics on the GPU, mixed-precision training,
#      KFAC's decompositions and the structures' algebra on the device);
#   2. a short float16 (autocast + GradScaler) and bfloat16 (pure) SINGD training with
#      every probe at every step, printing what NVML and the allocator reported;
#   3. a measurement: peak CUDA memory of a step with activation checkpointing, AdamW
#      against SINGD (on its curvature-update steps and between them);
#   4. the README's GPU column (Performance): the benchmark MLP's step times on the GPU
#      (CUDA events, medians) and their ratios, and the probes' overhead with readings
#      deferred (the GPU default) and read every step (the host reads the CPU counts);
#   5. FSDP2 (docs/distributed.md): torchrun with one rank per GPU (two processes on one
#      GPU are not FSDP's case: with one GPU it runs one rank, which still takes the
#      DTensor paths with NCCL), SINGD and KFAC on a sharded MLP against one process on
#      the whole batch, each rank's optimizer-state bytes and peak CUDA memory, and a
#      DCP save and resume that must continue bit for bit.
# Runs from the source tree (no install needed: torch, pandas, pyarrow, psutil, pytest
# and nvidia-ml-py are what it imports; plotly is not). Both parts run even if the
# first fails; exit code 1 if either failed or torch sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
status=0

"$PY" - <<'PY' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        "gpu-check: FAILED: torch sees no CUDA device (torch.cuda.is_available() is False, "
        f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
        "run this script on a machine with an NVIDIA GPU."
    )
props = torch.cuda.get_device_properties(torch.cuda.current_device())
print(f"gpu-check: {props.name}, {props.total_memory / 2**30:.1f} GiB, uuid {props.uuid}")
print(f"gpu-check: python {sys.version.split()[0]}, torch {torch.__version__}")
PY

echo "gpu-check: CUDA tests"
timeout 180 "$PY" -m pytest tests/probes tests/singd -m cuda -q -p no:cacheprovider -rs \
    || { echo "gpu-check: CUDA tests FAILED"; status=1; }

echo "gpu-check: float16 and bfloat16 training with every probe"
timeout 90 "$PY" - <<'PY' || { echo "gpu-check: training FAILED"; status=1; }
import math
import warnings

import torch
from torch import nn

import probes
from singd import SINGD

torch.manual_seed(0)
for dtype, mode in ((torch.float16, "mixed"), (torch.bfloat16, "pure")):
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    if mode == "pure":
        model = model.to(dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = SINGD(
        model, lr=1e-3, T=1, structures=("dense", "diagonal"), init_grad_scale=scaler.get_scale()
    )
    x = torch.randn(128, 256, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning from the probes is a failure here
        session = probes.attach(model, optimizer, every=1, dtype=dtype, run=f"{mode}-{dtype}")
    with session:
        for _ in range(20):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=mode == "mixed"):
                loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    frame = session.to_frame()
    memory = frame[(frame["probe"] == "memory") & frame["tensor"].isin(["cuda", "nvml"])]
    last = memory[memory["step"] == memory["step"].max()]
    print(f"\n{mode} {dtype}: loss {loss.item():.4f}")
    for row in last.itertuples():
        value = f"{row.value / 2**20:10.1f} MiB" if row.unit == "B" else f"{row.value:10.0f}"
        print(f"  {row.tensor:5s} {row.metric:20s} {value}   {row.module}")
    summary = session.summary()
    for key in ("steps", "nan_events", "skipped_steps", "underflow_fraction", "max_condition",
                "peak_memory_bytes", "step_time_ms", "probe_overhead_fraction"):
        print(f"  {key:24s} {summary[key]}")
    assert summary["peak_memory_bytes"] and summary["peak_memory_bytes"] > 0
    assert set(frame["probe"]) == {"condition", "numerics", "memory", "time"}
    assert math.isfinite(loss.item())
print("\ngpu-check: training OK")
PY
echo "gpu-check: activation checkpointing, peak CUDA memory of one step (a measurement)"
timeout 60 "$PY" - <<'PY' || { echo "gpu-check: checkpointing measurement FAILED"; status=1; }
# SINGD with diagonal factors reduces each layer's input to its statistic in the forward
# pass, so inside a checkpointed segment it keeps no input checkpointing frees: on its
# update steps (0 and 2) the peak is AdamW's, within 10% (on the CPU: equal, from the
# profiler; here from the CUDA allocator, exact).
import sys

import torch
from torch import nn

sys.path.insert(0, "benchmarks")
from test_checkpoint_memory import Blocks  # the CPU benchmark's model

from singd import SINGD

x = torch.randn(8192, 1024, device="cuda")
y = torch.randint(0, 10, (8192,), device="cuda")
results = {}
for name in ("adamw", "singd:diagonal"):
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Blocks(checkpointed).cuda()
        if name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters())
        else:
            optimizer = SINGD(model, T=2, structures=("diagonal", "diagonal"))
        peaks = []
        for _ in range(3):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        label = "checkpointed" if checkpointed else "plain"
        print(f"  {name:15s} {label:12s} peak MiB per step: "
              + ", ".join(f"{p:.0f}" for p in peaks) + "  (SINGD T=2: steps 0, 2 update)")
        results[name, checkpointed] = peaks
        del model, optimizer
        torch.cuda.empty_cache()
adamw, singd = results["adamw", True], results["singd:diagonal", True]
assert singd[2] <= 1.1 * adamw[2], f"SINGD checkpointed peak {singd[2]:.0f} MiB, AdamW {adamw[2]:.0f}"
PY

echo "gpu-check: the README's GPU column (MLP 256-512-512-10, batch 128, T=1, float32)"
timeout 120 "$PY" - <<'PY' || { echo "gpu-check: GPU column FAILED"; status=1; }
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, "benchmarks")
import mlp_step

import probes
from singd import KFAC, SINGD

warnings.simplefilter("ignore")


def build(name):
    model, x, y = mlp_step.build()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    if name == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), x, y
    if name == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), x, y
    if name.startswith("kfac:"):
        return model, KFAC(model, T=1, inverse_method=name[5:]), x, y
    structure = name.split(":")[1].split("+")[0]
    optimizer = SINGD(model, structures=(structure, structure), **mlp_step.SINGD_KWARGS)
    return model, optimizer, x, y


def median_ms(name, probed=None, steps=60):
    model, optimizer, x, y = build(name)
    session = None
    if probed is not None:
        session = probes.attach(model, optimizer, read_every_step=probed)
    step = mlp_step.make_step(model, optimizer, x, y)
    for _ in range(10):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    if session is not None:
        session.detach()
    return statistics.median(times)


names = ["adamw", "sgd", "singd:diagonal", "singd:hierarchical15_15", "singd:dense",
         "singd:triltoeplitz", "kfac:cholesky", "kfac:inv", "kfac:eigh"]
ms = {name: median_ms(name) for name in names}
print("| step | GPU ms | vs AdamW |")
print("|---|---|---|")
for name in names:
    print(f"| {name} | {ms[name]:.2f} | {ms[name] / ms['adamw']:.2f} |")
for structure in ("singd:diagonal", "singd:dense"):
    bare = median_ms(structure)
    deferred, every = median_ms(structure, False), median_ms(structure, True)
    print(f"| probes on {structure}, deferred / read every step | "
          f"{100 * (deferred / bare - 1):+.1f}% / {100 * (every / bare - 1):+.1f}% | |")
PY

echo "gpu-check: FSDP2 (fully_shard) with SINGD and KFAC"
fsdp_script="$(mktemp --suffix=.py)"
cat > "$fsdp_script" <<'PY'
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.getcwd())
from singd import KFAC, SINGD  # noqa: E402
from singd.optim.checkpoint import dcp_state_dict, load_dcp  # noqa: E402

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if cuda else "cpu"
if cuda:
    torch.cuda.set_device(device)
STEPS, BATCH = 10, 64
generator = torch.Generator().manual_seed(1)
# float64: the sharded and the single run differ only in the order of sums, which
# float32 rounding and a preconditioner of 512 x 512 factors amplify past a tight bound.
inputs = torch.randn(STEPS, BATCH, 256, generator=generator, dtype=torch.float64).to(device)
targets = torch.randint(0, 10, (STEPS, BATCH), generator=generator).to(device)
BUILD = {
    "singd:dense": lambda m: SINGD(m, lr=0.05, lr_cov=0.05, T=1, structures=("dense", "dense")),
    "singd:diagonal": lambda m: SINGD(
        m, lr=0.05, lr_cov=0.05, T=1, structures=("diagonal", "diagonal")
    ),
    "kfac:cholesky": lambda m: KFAC(m, lr=0.05, damping=1e-2, T=1),
}


def model(sharded):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 10))
    net = net.to(device, torch.float64)
    if sharded:
        fully_shard(net[0])
        fully_shard(net[3])
        fully_shard(net)
    return net


def train(net, optimizer, steps, rows):
    for step in steps:
        loss = nn.functional.cross_entropy(net(inputs[step][rows]), targets[step][rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full(net):
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in net.parameters()]


rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
failed = False
for name, build in BUILD.items():
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    net = model(True)
    optimizer = build(net)
    train(net, optimizer, range(STEPS // 2), rows)
    path = tempfile.mkdtemp() if rank == 0 else None
    path = [path]
    dist.broadcast_object_list(path)
    dcp.save({"model": net.state_dict(), "optimizer": dcp_state_dict(optimizer)}, checkpoint_id=path[0])
    train(net, optimizer, range(STEPS // 2, STEPS), rows)
    sharded = full(net)
    mine, total = optimizer.state_bytes(), optimizer.state_bytes(total=True)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    resumed_net = model(True)
    resumed = build(resumed_net)
    state = {"model": resumed_net.state_dict()}
    dcp.load(state, checkpoint_id=path[0])
    resumed_net.load_state_dict(state["model"])
    load_dcp(resumed, path[0])
    train(resumed_net, resumed, range(STEPS // 2, STEPS), rows)
    bitwise = all(torch.equal(a, b) for a, b in zip(full(resumed_net), sharded))
    print(f"rank {rank}/{world} {name}: state {sum(mine.values()) / 2**20:.2f} MiB of "
          f"{sum(total.values()) / 2**20:.2f} MiB, peak CUDA {peak / 2**20:.1f} MiB, "
          f"DCP resume bit for bit: {bitwise}", flush=True)
    failed |= not bitwise
    # The reference: every rank trains an unsharded copy on the whole batch (its
    # all-reductions then average identical values: one process's result, at 2 ranks).
    single = model(False)
    reference = build(single)
    train(single, reference, range(STEPS), slice(None))
    initial = full(model(False))
    num = sum(float((a - b).double().square().sum()) for a, b in zip(sharded, full(single)))
    den = sum(float((b - c).double().square().sum()) for b, c in zip(full(single), initial))
    error = (num / den) ** 0.5
    if rank == 0:
        print(f"{name}: {world} rank(s) against one process, relative update error {error:.2e}")
    failed |= not error <= 1e-9
dist.barrier()
dist.destroy_process_group()
sys.exit(1 if failed else 0)
PY
gpus="$("$PY" -c 'import torch; print(min(max(torch.cuda.device_count(), 1), 2))')"
echo "gpu-check: FSDP on $gpus rank(s), one per GPU"
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" "$fsdp_script" \
    || { echo "gpu-check: FSDP FAILED"; status=1; }
rm -f "$fsdp_script"

if [ "$status" -eq 0 ]; then
    echo "gpu-check: OK"
else
    echo "gpu-check: FAILED (see above)"
fi
exit "$status"
