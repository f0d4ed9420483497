"""``precision-lab stress`` as a real process, for tests that kill, signal, race or starve it.

A tiny suite (the MLP, AdamW, float32, one run per seed; each run a fraction of a second
after the ~2 s start-up) keeps every such test to a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TINY_SUITE = """
models = ["mlp"]
scenarios = ["baseline"]
optimizers = ["adamw"]
dtypes = ["float32"]
seeds = [{seeds}]
steps = {steps}
every = 1
"""


def tiny_suite(folder: Path, *, seeds: int = 6, steps: int = 3) -> Path:
    """Write the tiny suite with ``seeds`` runs of ``steps`` steps; return its path."""
    path = folder / f"tiny-{seeds}x{steps}.toml"
    seed_list = ", ".join(str(s) for s in range(seeds))
    path.write_text(TINY_SUITE.format(seeds=seed_list, steps=steps), encoding="utf-8")
    return path


def start(suite: Path, out: Path, **popen: object) -> subprocess.Popen:
    """Start ``python -m precision_lab stress`` on ``suite`` into ``out`` (this checkout's
    code, one torch thread), its output piped."""
    command = [sys.executable, "-m", "precision_lab", "stress", "--suite", str(suite)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [*command, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def finished_runs(out: Path) -> int:
    """How many runs summary.json says have finished (0 while it does not exist)."""
    try:
        runs = json.loads((out / "summary.json").read_text())["runs"]
    except (OSError, ValueError):
        return 0
    return sum(bool(r["finished"]) for r in runs)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 90):
    """Poll ``condition`` until it holds; fail if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"stress ended first (exit {process.returncode}).")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("stress did not get there in time.")
        time.sleep(0.02)


def temporary_files(out: Path) -> list[Path]:
    """Files the writer had not renamed into place."""
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]
