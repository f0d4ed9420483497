"""Step time of KFAC, per inverse method, against SINGD with dense factors.

Run (not part of the default test run, whose testpaths is tests/):

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_kfac_step.py

Workload (`mlp_step.py`, the SINGD benchmark's): one training step of an MLP
256-512-512-10, batch 128, T=1 (factors and inverses, or K and C, change every step),
float32, one thread. KFAC inverts ``A`` (257, 513, 513) and ``G`` (512, 512, 10) at
every step; SINGD dense updates ``K`` and ``C`` of the same sizes without inverting.

Every timed KFAC round is preceded by one timed SINGD-dense step (pytest-benchmark's
``setup``), so both see the same machine load; each side's median over the rounds
(warm-up excluded) gives ``ratio = median KFAC / median SINGD dense`` (dimensionless),
by CPU time (`time.process_time`, what the step costs) and by wall clock. Newton-Schulz
warm-starts from the previous inverse, which is what makes it affordable at T=1 (the
factors move by ``1 - factor_decay`` of the batch estimate per step). FLOPs are those
torch's FlopCounterMode sees dispatched in one step (matrix products only; LAPACK
factorizations are not counted). Figures are recorded, not asserted, and written to
``benchmarks/results/kfac_step.{md,json}`` with the machine's load average.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import mlp_step
import pytest
import torch
from results_table import machine_info, write_results

from singd import KFAC, SINGD
from singd.optim.inverses import INVERSE_METHODS

ROUNDS = 20
WARMUP = 3
KFAC_KWARGS = {"lr": 1e-3, "damping": 1e-3, "T": 1, "factor_decay": 0.95}


@pytest.fixture(scope="module")
def table():
    rows: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    yield rows
    if rows:
        write_table(rows, load_before, os.getloadavg())


def singd_dense_step():
    model, x, y = mlp_step.build()
    optimizer = SINGD(model, structures=("dense", "dense"), **mlp_step.SINGD_KWARGS)
    return mlp_step.make_step(model, optimizer, x, y)


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_kfac_step_against_singd_dense(benchmark, table, record_memory, method):
    torch.set_num_threads(1)
    model, x, y = mlp_step.build()
    optimizer = KFAC(model, inverse_method=method, **KFAC_KWARGS)
    step = mlp_step.make_step(model, optimizer, x, y)
    partner = mlp_step.timed(singd_dense_step())
    ours, theirs = [], []
    timed_step = mlp_step.timed(step)
    benchmark.pedantic(
        lambda: ours.append(timed_step()),
        setup=lambda: theirs.append(partner()),
        rounds=ROUNDS,
        warmup_rounds=WARMUP,
        iterations=1,
    )
    if benchmark.disabled:
        return
    medians = {}
    for who, times in (("kfac", ours[WARMUP:]), ("singd", theirs[WARMUP:])):
        for clock, values in zip(("wall", "cpu"), zip(*times, strict=True), strict=True):
            medians[f"{who}_{clock}"] = statistics.median(values)
    flops = mlp_step.count_flops(step)
    row = {
        "kfac_cpu_ms": medians["kfac_cpu"] * 1e3,
        "singd_dense_cpu_ms": medians["singd_cpu"] * 1e3,
        "ratio_cpu": medians["kfac_cpu"] / medians["singd_cpu"],
        "ratio_wall": medians["kfac_wall"] / medians["singd_wall"],
        "flops_kfac": flops,
        "failed_decompositions": optimizer.failed_decompositions,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }
    record_memory(optimizer)
    row["state_bytes"] = benchmark.extra_info["state_bytes"]
    benchmark.extra_info.update(row)
    table[f"kfac:{method}"] = row


def write_table(rows: dict[str, dict[str, Any]], load_before, load_after) -> None:
    """The figures as a Markdown table to paste, and as JSON."""
    machine = machine_info(load_before, load_after)
    lines = [
        "| step: MLP 256-512-512-10, batch 128, T=1, 1 thread | KFAC ms | SINGD dense ms "
        "| ratio (CPU) | ratio (wall) | GFLOP (products) | state MiB | failed inversions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['kfac_cpu_ms']:.1f} | {row['singd_dense_cpu_ms']:.1f} "
            f"| {row['ratio_cpu']:.2f} | {row['ratio_wall']:.2f} | {row['flops_kfac'] / 1e9:.2f} "
            f"| {row['state_bytes'] / 2**20:.1f} | {row['failed_decompositions']} |"
        )
    lines.append("")
    lines.append(
        f"Medians of {ROUNDS} interleaved rounds after {WARMUP} warm-up rounds, CPU time "
        f"(time.process_time); ratio = KFAC / SINGD dense. torch {machine['torch']}, "
        f"{machine['processor']}, one thread; 1-minute load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after."
    )
    write_results("kfac_step", machine, rows, lines)
