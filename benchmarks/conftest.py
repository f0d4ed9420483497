"""Shared settings for the pytest-benchmark suites: comparable runs, memory in ``extra_info``.

Benchmarks are not collected by the default ``pytest`` (testpaths is ``tests``); run them
with ``pytest benchmarks --benchmark-autosave`` and compare saved runs with
``pytest-benchmark compare`` (README, "Performance").

Timings are only comparable when made with the same number of threads: every benchmark
runs with ``PRECISION_LAB_BENCH_THREADS`` torch threads (default 1), and the machine
information saved with each run records that number, torch's version and the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import torch

THREADS = int(os.environ.get("PRECISION_LAB_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True)
def _fixed_threads_and_seed() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table(request) -> Iterator[dict[str, dict[str, Any]]]:
    """Rows the module's tests collect, written by the module's own ``write_table(rows,
    load_before, load_after)`` (Markdown and JSON results) when the module ends, with the
    machine's load averages before and after."""
    rows: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    yield rows
    if rows:
        request.module.write_table(rows, load_before, os.getloadavg())


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Record what makes two timings comparable beside pytest-benchmark's CPU information."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = THREADS
    machine_info["cuda_device"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else None
    )


@pytest.fixture
def record_memory(benchmark) -> Callable[..., dict[str, int]]:
    """Put an optimizer's state bytes and the process's memory into ``benchmark.extra_info``.

    Call it after the benchmarked steps: ``record_memory(optimizer)`` stores, in bytes,
    ``state_bytes`` (the total of ``optimizer.state_bytes()``, the Kronecker optimizers'
    accounting of factors, momenta, inverses, parameter buffers and fallback state),
    ``state_bytes.<category>`` for each category, ``rss_bytes`` (this process's resident
    memory now), and on CUDA ``cuda_peak_bytes`` (the allocator's peak since the last reset).
    For an optimizer without ``state_bytes()`` (AdamW, SGD) the total is the bytes of every
    tensor in ``optimizer.state``.

    Returns:
        The figures stored, by name (bytes).
    """

    def record(optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        figures: dict[str, int] = {}
        if optimizer is not None:
            if hasattr(optimizer, "state_bytes"):
                categories = optimizer.state_bytes()
                figures |= {f"state_bytes.{name}": int(n) for name, n in categories.items()}
                figures["state_bytes"] = int(sum(categories.values()))
            else:
                figures["state_bytes"] = sum(
                    value.numel() * value.element_size()
                    for state in optimizer.state.values()
                    for value in state.values()
                    if isinstance(value, torch.Tensor)
                )
        figures["rss_bytes"] = psutil.Process().memory_info().rss
        if torch.cuda.is_available():
            figures["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        benchmark.extra_info.update(figures)
        return figures

    return record
