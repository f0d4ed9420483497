"""Cost of the two structure operations a SINGD step leans on, per structure, vs dense.

Run (not part of the default test run, whose testpaths is tests/):

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_structures.py

Workload: d = 512, n = 128, float32, one thread: ``K.from_inner(X^T)`` for rows X of
shape (n, d), the curvature term ``P(K^T X^T X K)`` of every backward pass, and ``K @ G`` for
G of shape (d, n), as in the natural gradient ``K K^T G``. K is a non-symmetric member
of the structure (the identity after a few random updates). Each test's median CPU time
(s, ``time.process_time``) is in pytest-benchmark's table; the module then prints and writes
``benchmarks/results/structures.{md,json}`` with ``ratio = median(structure) /
median(dense)`` for the same operation (dimensionless, smaller is faster) and the
machine's load average, since other processes skew the timings.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from singd.structures import STRUCTURE_NAMES, get_structure

DIM, ROWS = 512, 128
RESULTS = Path(__file__).resolve().parent / "results"
MEDIANS: dict[tuple[str, str], float] = {}


def member(name: str) -> object:
    """A non-symmetric member of the structure near the identity."""
    cls = get_structure(name)
    K = cls.eye(DIM)
    for _ in range(2):
        step = cls.from_gram(torch.randn(8, DIM) / DIM)
        K = K @ step.diag_add_(1.0)
    return K


OPERATIONS = {
    "from_inner": lambda K, X, G: K.from_inner(X.T),
    "matmat": lambda K, X, G: K @ G,
}


@pytest.fixture(scope="module", autouse=True)
def _ratio_table():
    load_before = os.getloadavg()[0]
    yield
    rows = []
    for operation in OPERATIONS:
        dense = MEDIANS.get(("dense", operation))
        for name in STRUCTURE_NAMES:
            median = MEDIANS.get((name, operation))
            if median is None or dense is None:
                continue
            rows.append(
                {
                    "structure": name,
                    "operation": operation,
                    "median_ms": median * 1e3,
                    "ratio_to_dense": median / dense,
                }
            )
    if not rows:
        return
    lines = [
        f"d = {DIM}, n = {ROWS}, float32, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other processes on the machine skew timings)",
        "",
        "| structure | operation | median CPU time (ms) | ratio to dense |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['structure']} | {r['operation']} | {r['median_ms']:.3f} | "
        f"{r['ratio_to_dense']:.3f} |"
        for r in rows
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structures.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "structures.json").write_text(json.dumps(rows, indent=1))
    print("\n" + "\n".join(lines))


# CPU time of this process, not wall-clock: on a machine shared with other jobs it is the
# steadier figure (other processes delay us but do not add to our CPU time).
@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_structure_operation(benchmark, name, operation):
    K = member(name)
    X, G = torch.randn(ROWS, DIM), torch.randn(DIM, ROWS)
    run = OPERATIONS[operation]
    benchmark.group = operation
    benchmark.extra_info.update({"dim": DIM, "rows": ROWS, "structure": name})
    result = benchmark(run, K, X, G)
    assert result is not None
    MEDIANS[(name, operation)] = benchmark.stats.stats.median
