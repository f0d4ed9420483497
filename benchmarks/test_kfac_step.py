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
    timed = mlp_step.alternate(benchmark, mlp_step.timed(step), partner, ROUNDS, WARMUP)
    if timed is None:
        return
    medians = {}
    for who, times in zip(("kfac", "singd"), timed, strict=True):
        # `mlp_step.timed` gives (wall s, CPU s, minor page faults) per step.
        for clock, values in zip(("wall", "cpu", "faults"), zip(*times, strict=True), strict=True):
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


# ----------------------------------------------------------------------------------------
# Amortized: KFAC per inverse method against AdamW and SGD with momentum, T=1 and T=10
# ----------------------------------------------------------------------------------------
AMORTIZED_ROUNDS = 12
AMORTIZED_WARMUP = 2
#: Consecutive steps per side and round: a training loop runs its steps back to back.
T1_BLOCK = 3
#: With T=10 each round runs 10 consecutive steps: one update step and nine between.
T10_PERIOD = 10
FIRST_ORDER_BLOCK = 5


def _steps_of(kind: str):
    """A fresh (model, optimizer, step) for AdamW, SGD with momentum or KFAC."""
    model, x, y = mlp_step.build()
    if kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        method, period = kind.split("@")
        optimizer = KFAC(model, inverse_method=method, **{**KFAC_KWARGS, "T": int(period)})
    return optimizer, mlp_step.timed(mlp_step.make_step(model, optimizer, x, y))


def test_kfac_amortized_against_first_order(benchmark):
    """Every inverse method at T=1 (every step updates factors and inverses) and at T=10
    (update steps and the nine steps between, apart, and their mean), against AdamW and
    SGD with momentum, all interleaved in one process: each round runs a block of every
    side in turn, so the ratios share the machine's load.

    Ratios are of median CPU times: ``T=1 / AdamW``, ``T=10 update step / AdamW``,
    ``T=10 step between updates / SGD`` and ``/ AdamW``, and the amortized
    ``(update + 9 between) / 10 / AdamW`` (medians of each kind, so one slow update
    step does not dominate). Written to ``benchmarks/results/kfac_amortized.{md,json}``.
    """
    torch.set_num_threads(1)
    sides = {kind: _steps_of(kind) for kind in ("adamw", "sgd")}
    for method in INVERSE_METHODS:
        for period in (1, T10_PERIOD):
            sides[f"{method}@{period}"] = _steps_of(f"{method}@{period}")
    times: dict[str, list[float]] = {kind: [] for kind in sides}
    times |= {f"{method}@{T10_PERIOD}:update": [] for method in INVERSE_METHODS}
    load_before = os.getloadavg()

    def one_round() -> None:
        for kind, (optimizer, timed_step) in sides.items():
            if kind in ("adamw", "sgd"):
                block = [timed_step()[1] for _ in range(FIRST_ORDER_BLOCK)]
                times[kind].extend(block[1:])  # the first step after another side: cold
            elif kind.endswith("@1"):
                block = [timed_step()[1] for _ in range(T1_BLOCK)]
                times[kind].extend(block[1:])
            else:
                for _ in range(T10_PERIOD):
                    update = optimizer.steps % T10_PERIOD == 0
                    cpu = timed_step()[1]
                    times[f"{kind}:update" if update else kind].append(cpu)

    for _ in range(AMORTIZED_WARMUP):
        one_round()
    for values in times.values():
        values.clear()
    benchmark.pedantic(one_round, rounds=AMORTIZED_ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    median = {kind: statistics.median(values) for kind, values in times.items()}
    adamw, sgd = median["adamw"], median["sgd"]
    rows: dict[str, dict[str, Any]] = {}
    for method in INVERSE_METHODS:
        update = median[f"{method}@{T10_PERIOD}:update"]
        between = median[f"{method}@{T10_PERIOD}"]
        amortized = (update + (T10_PERIOD - 1) * between) / T10_PERIOD
        rows[method] = {
            "t1_ms": median[f"{method}@1"] * 1e3,
            "t10_update_ms": update * 1e3,
            "t10_between_ms": between * 1e3,
            "t10_amortized_ms": amortized * 1e3,
            "t1_vs_adamw": median[f"{method}@1"] / adamw,
            "t10_update_vs_adamw": update / adamw,
            "t10_between_vs_sgd": between / sgd,
            "t10_between_vs_adamw": between / adamw,
            "t10_amortized_vs_adamw": amortized / adamw,
            "failed_decompositions": sum(
                optimizer.failed_decompositions
                for kind, (optimizer, _) in sides.items()
                if kind.startswith(f"{method}@")
            ),
        }
    rows["first-order"] = {"adamw_ms": adamw * 1e3, "sgd_momentum_ms": sgd * 1e3}
    benchmark.extra_info.update({f"{m}.{k}": v for m, row in rows.items() for k, v in row.items()})
    write_amortized_table(rows, load_before, os.getloadavg())


def write_amortized_table(rows: dict[str, dict[str, Any]], load_before, load_after) -> None:
    machine = machine_info(load_before, load_after)
    first = rows["first-order"]
    lines = [
        "| KFAC inverse | T=1 ms | T=1 / AdamW | T=10 update ms | update / AdamW "
        "| T=10 between ms | between / SGD-m | between / AdamW | T=10 amortized / AdamW "
        "| failed inversions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in INVERSE_METHODS:
        row = rows[method]
        lines.append(
            f"| {method} | {row['t1_ms']:.1f} | {row['t1_vs_adamw']:.2f} "
            f"| {row['t10_update_ms']:.1f} | {row['t10_update_vs_adamw']:.2f} "
            f"| {row['t10_between_ms']:.2f} | {row['t10_between_vs_sgd']:.2f} "
            f"| {row['t10_between_vs_adamw']:.2f} | {row['t10_amortized_vs_adamw']:.2f} "
            f"| {row['failed_decompositions']} |"
        )
    lines.append("")
    lines.append(
        f"AdamW {first['adamw_ms']:.2f} ms, SGD with momentum {first['sgd_momentum_ms']:.2f} "
        f"ms per step. MLP 256-512-512-10, batch 128, float32, one thread; medians of CPU "
        f"time over {AMORTIZED_ROUNDS} interleaved rounds after {AMORTIZED_WARMUP} warm-up "
        f"rounds (each round: {FIRST_ORDER_BLOCK} AdamW and SGD steps, {T1_BLOCK} steps of "
        f"each T=1 KFAC, {T10_PERIOD} of each T=10 KFAC; a block's first step left out "
        f"except with T=10). Amortized = (update + 9 x between) / 10. singd at "
        f"{machine['commit']}; torch {machine['torch']}, {machine['processor']}; 1-minute "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after."
    )
    write_results("kfac_amortized", machine, rows, lines)
