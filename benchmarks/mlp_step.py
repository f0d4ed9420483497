"""The benchmarked workload: one training step of an MLP 256-512-512-10, batch 128.

Imported by both sides of the comparison, so they time the same thing: by
`benchmarks/test_singd_step.py` in the project's environment (our `singd`, AdamW) and by
`benchmarks/reference_step.py` inside the reference's virtual environment (PyPI
`singd` 0.0.5). It imports nothing but torch, and never `singd`: each side passes in
its own optimizer class.

One step is: forward, cross-entropy (mean over the batch), backward, `optimizer.step()`,
`optimizer.zero_grad()`; with T=1 every step also updates the preconditioner. Float32,
one thread (`torch.set_num_threads(1)`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WIDTHS = (256, 512, 512, 10)
BATCH = 128

#: SINGD's hyperparameters for the benchmark; T=1: the preconditioner changes every step.
SINGD_KWARGS = {"lr": 1e-3, "lr_cov": 1e-2, "T": 1}


def build(
    seed: int = 0, widths: tuple[int, ...] = WIDTHS, batch: int = BATCH
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The MLP (ReLU between Linear layers, all with bias) and one fixed batch; other
    ``widths`` and ``batch`` sizes for the probe-overhead sweep only."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(batch, widths[0])
    y = torch.randint(widths[-1], (batch,))
    return model, x, y


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """The timed unit: one full training step."""

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def timed(step: Callable[[], None]) -> Callable[[], tuple[float, float, int]]:
    """Wrap `step` so that each call returns (wall-clock s, CPU s, minor page faults).

    Wall clock is `time.perf_counter`; CPU time is `time.process_time`, the time this
    process computed. With one thread on a machine shared with other jobs, CPU time is
    what the step costs, and the wall clock adds the time spent waiting for a core.
    Minor page faults (`getrusage`) count the fresh memory pages the step touched: each
    large temporary that glibc serves from freshly mapped or re-grown heap memory costs
    one per 4 KiB page, and whether it does depends on the process's allocation history,
    which makes a step's time differ by milliseconds between otherwise equal processes.
    """

    def run() -> tuple[float, float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    return run


def count_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one step as executed, by torch's FlopCounterMode.

    Counts the matrix products (mm, addmm, bmm, baddbmm, convolutions, ...) that the
    step actually dispatches, 2 per multiply-add; elementwise work is not counted, so
    this is the figure that dense linear algebra dominates.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


Times = list[tuple[float, float, int]]


def alternate(
    benchmark, ours: Callable[[], tuple], theirs: Callable[[], tuple], rounds: int, warmup: int
) -> tuple[Times, Times] | None:
    """One step of `theirs` (pytest-benchmark's setup), then one of `ours` (timed by it),
    `rounds` times after `warmup` rounds: both `timed` steps see the same machine load.

    Returns:
        The two sides' `timed` triples after the warm-up, or None when benchmarking is
        disabled (`--benchmark-disable` runs once and measures nothing).
    """
    mine: Times = []
    other: Times = []
    benchmark.pedantic(
        lambda: mine.append(ours()),
        setup=lambda: other.append(theirs()),
        rounds=rounds,
        warmup_rounds=warmup,
        iterations=1,
    )
    if benchmark.disabled:
        return None
    return mine[warmup:], other[warmup:]
