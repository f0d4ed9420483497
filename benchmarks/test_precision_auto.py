"""What ``precision="auto"`` costs: on a healthy run (no escalation) and per escalation.

Run (not part of the default test run, whose testpaths is tests/):

    python -m pytest benchmarks/test_precision_auto.py

Workload (`mlp_step.py`): one training step of an MLP 256-512-512-10, batch 128, T=1
(every step updates the preconditioner, so every step pays the escalation check: the
worst case; at T=10 nine steps in ten pay nothing), one thread.

- **Healthy**: KFAC (cholesky, damping 1e-3) and SINGD (dense K and C) with float32
  factors, ``precision="auto"`` against ``None``; the benchmark checks that no factor
  changed dtype. Each timed ``auto`` step is preceded by one timed ``None`` step of a twin
  model and optimizer (pytest-benchmark's ``setup``), so both see the same load. Figure:
  ``ratio = median(auto) / median(None)`` of CPU time (`time.process_time`), with the
  spread of the per-round ratios (``auto_i / None_i``: quartiles).
- **Per escalation**: KFAC with bfloat16 factors at damping 1e-3, whose first update
  widens factors on their condition bound (``kappa_1 eps > 1/8`` with ``eps = 2^-7``,
  docs/precision.md). Fresh model and optimizer per round, the first step timed for
  ``auto`` and ``None`` alternately; ``(median(auto first step) - median(None first
  step)) / events`` is the cost of one escalation (reading, promotion, re-inversion in
  the wider dtype), in ms.

Figures are recorded, not asserted, and written to
``benchmarks/results/precision_auto.{md,json}`` with the machine's load average.
"""

from __future__ import annotations

import statistics
from typing import Any

import mlp_step
import pytest
import torch
from results_table import machine_info, write_results

from singd import KFAC, SINGD

ROUNDS = 21
WARMUP = 3
FIRST_STEP_ROUNDS = 9
KFAC_KWARGS = {"lr": 1e-3, "damping": 1e-3, "T": 1, "factor_decay": 0.95}
HEALTHY = {
    "kfac:cholesky": lambda model, precision: KFAC(model, precision=precision, **KFAC_KWARGS),
    "singd:dense": lambda model, precision: SINGD(
        model, structures=("dense", "dense"), precision=precision, **mlp_step.SINGD_KWARGS
    ),
}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def _timed_step(name: str, precision: str | None):
    model, x, y = mlp_step.build()
    optimizer = HEALTHY[name](model, precision)
    return optimizer, mlp_step.timed(mlp_step.make_step(model, optimizer, x, y))


@pytest.mark.parametrize("name", list(HEALTHY))
def test_auto_on_a_healthy_run(benchmark, table, name):
    torch.set_num_threads(1)
    auto, auto_step = _timed_step(name, "auto")
    _, plain_step = _timed_step(name, None)
    timed = mlp_step.alternate(benchmark, auto_step, plain_step, ROUNDS, WARMUP)
    if timed is None:
        return
    ours, theirs = timed
    assert auto.precision_events == []  # healthy: the check ran, nothing was widened
    cpu_auto = [t[1] for t in ours]
    cpu_plain = [t[1] for t in theirs]
    q1, _, q3 = _quartiles([a / p for a, p in zip(cpu_auto, cpu_plain, strict=True)])
    row = {
        "auto_cpu_ms": statistics.median(cpu_auto) * 1e3,
        "none_cpu_ms": statistics.median(cpu_plain) * 1e3,
        "ratio_cpu": statistics.median(cpu_auto) / statistics.median(cpu_plain),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_wall": statistics.median(t[0] for t in ours)
        / statistics.median(t[0] for t in theirs),
    }
    benchmark.extra_info.update(row)
    table[f"healthy {name}"] = row


def _first_step(precision: str | None) -> tuple[float, int]:
    """CPU seconds of a fresh bfloat16-factor KFAC's first step, and its events."""
    model, x, y = mlp_step.build()
    optimizer = KFAC(model, precision=precision, factor_dtype=torch.bfloat16, **KFAC_KWARGS)
    _, cpu, _ = mlp_step.timed(mlp_step.make_step(model, optimizer, x, y))()
    return cpu, len(optimizer.precision_events)


def test_cost_per_escalation(benchmark, table):
    torch.set_num_threads(1)
    _first_step("auto")  # warm-up: allocator and kernels
    auto, plain, events = [], [], []

    def both() -> None:
        cpu, n = _first_step("auto")
        auto.append(cpu)
        events.append(n)
        plain.append(_first_step(None)[0])

    benchmark.pedantic(both, rounds=FIRST_STEP_ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    assert len(set(events)) == 1 and events[0] > 0  # the same escalations every round
    extra = statistics.median(auto) - statistics.median(plain)
    diffs = sorted((a - p) / events[0] * 1e3 for a, p in zip(auto, plain, strict=True))
    q1, _, q3 = _quartiles(diffs)
    row = {
        "events": events[0],
        "auto_first_step_cpu_ms": statistics.median(auto) * 1e3,
        "none_first_step_cpu_ms": statistics.median(plain) * 1e3,
        "ms_per_escalation": extra / events[0] * 1e3,
        "ms_per_escalation_q1": q1,
        "ms_per_escalation_q3": q3,
    }
    benchmark.extra_info.update(row)
    table["per escalation (KFAC bf16 factors, first step)"] = row


def write_table(rows: dict[str, dict[str, Any]], load_before, load_after) -> None:
    """The figures as Markdown and JSON."""
    machine = machine_info(load_before, load_after)
    lines = [
        '| precision="auto" vs None, MLP 256-512-512-10, batch 128, T=1, 1 thread '
        "| auto ms | None ms | ratio (CPU) | per-round ratio q1-q3 | ratio (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "ratio_cpu" in row:
            lines.append(
                f"| {name} | {row['auto_cpu_ms']:.1f} | {row['none_cpu_ms']:.1f} "
                f"| {row['ratio_cpu']:.3f} | {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f} "
                f"| {row['ratio_wall']:.3f} |"
            )
    for name, row in rows.items():
        if "ms_per_escalation" in row:
            lines.append("")
            lines.append(
                f"{name}: {row['events']} escalations; first step "
                f"{row['auto_first_step_cpu_ms']:.1f} ms (auto) vs "
                f"{row['none_first_step_cpu_ms']:.1f} ms (None): "
                f"{row['ms_per_escalation']:.2f} ms per escalation (per-round q1-q3 "
                f"{row['ms_per_escalation_q1']:.2f}-{row['ms_per_escalation_q3']:.2f})."
            )
    lines.append("")
    lines.append(
        f"Medians of {ROUNDS} interleaved rounds after {WARMUP} warm-up rounds (healthy) and "
        f"{FIRST_STEP_ROUNDS} fresh builds (per escalation), CPU time (time.process_time). "
        f"torch {machine['torch']}, {machine['processor']}, one thread; 1-minute load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after."
    )
    write_results("precision_auto", machine, rows, lines)
