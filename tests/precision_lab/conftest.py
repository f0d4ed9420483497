"""Fixtures shared by precision_lab's tests: the quick suite, run once per session.

``quick_runs(dtype, threads)`` runs ``precision-lab stress --suite quick`` (real training
on the digits, real probes, a real run directory) the first time a test asks for that
dtype and thread count; ``quick_run`` is the bfloat16 one on the machine's default thread
count, which the stress, report and gate tests of the default run share (the other
dtypes and thread counts are asked for by ``slow`` tests only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from precision_lab.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_THREADS = torch.get_num_threads()
QUICK_ARGS = ("stress", "--suite", "quick", "--device", "cpu")


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory) -> Callable[[str, int], Path]:
    """``run(dtype, threads)``: the quick suite's run directory in ``dtype`` (fp32, fp16,
    bf16) on ``threads`` torch threads, run on first use; what the command printed is
    kept beside it, in ``output.txt``."""
    done: dict[tuple[str, int], Path] = {}

    def run(dtype: str, threads: int) -> Path:
        if (dtype, threads) not in done:
            out = tmp_path_factory.mktemp(f"quick-{dtype}-{threads}threads") / "run"
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                args = [*QUICK_ARGS, "--dtype", dtype, "--out", str(out)]
                result = CliRunner().invoke(cli, args)
            finally:
                torch.set_num_threads(before)
            assert result.exit_code == 0, result.output
            out.with_name("output.txt").write_text(result.output, encoding="utf-8")
            done[dtype, threads] = out
        return done[dtype, threads]

    return run


@pytest.fixture(scope="session")
def quick_run(quick_runs) -> Path:
    """The bfloat16 quick suite (with its float32 controls) on the default thread count."""
    return quick_runs("bf16", DEFAULT_THREADS)


def pytest_sessionfinish(session):
    """Every precision_lab module the tests loaded is this checkout's: an import of a
    module that moved must fail here, not load a stale copy from another installation."""
    stale = sorted(
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "precision_lab"
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(ROOT)
    )
    if stale:
        session.exitstatus = 1
        print(f"\nprecision_lab modules loaded from outside {ROOT}: {stale}", file=sys.stderr)
