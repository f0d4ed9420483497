"""Run directories with DESIGN.md's schema, for the gate and baseline tests.

The figures are those of a small quick-suite-like matrix: two models, an MLP run that
diverges in bfloat16, float32 controls of the low-precision runs. Tests copy them, inject one
regression, and write the result as a real run directory (summary.json, config.json).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

MIB = 2**20

CONFIG = {
    "suite": "quick",
    "optimizers": ["singd:diagonal", "kfac:cholesky"],
    "dtypes": ["bfloat16"],
    "modes": ["pure"],
    "seeds": [0],
    "steps": 50,
    "batch_size": 64,
    "every": 10,
    "world_size": 1,
    "versions": {"torch": "2.13.0+cpu", "python": "3.11", "precision_lab": "0.1.0"},
    "device": "cpu",
    "command": "precision-lab stress --suite quick --dtype bf16",
}


def _run(run_id: str, model: str, optimizer: str, dtype: str, **figures: Any) -> dict[str, Any]:
    run = {
        "run": run_id,
        "model": model,
        "scenario": "baseline",
        "optimizer": optimizer,
        "structure": optimizer.partition(":")[2] or None,
        "dtype": dtype,
        "mode": "pure",
        "seed": 0,
        "control_of": None,
        "steps": 50,
        "finished": True,
        "diverged": False,
        "first_nonfinite_step": None,
        "nan_events": 0,
        "inf_events": 0,
        "skipped_steps": 0,
        "overflow_events": 0,
        "underflow_fraction": 0.002,
        "max_condition": 1.5e3,
        "optimizer_state_bytes": 123_456,
        "peak_memory_bytes": 310 * MIB,
        "peak_tensor_bytes": 400_000,
        "final_loss": 0.42,
        "accuracy": 0.91,
        "step_time_ms": 12.5,
        "failure_cause": "none",
        "error": None,
        "seeds_broken": 0,
        "seeds_total": 1,
        "hyperparameters": {"lr": 0.01},
        "fallback_optimizer": None,
        "control": None,
    }
    run.update(figures)
    return run


def base_runs() -> list[dict[str, Any]]:
    """The run objects of the reference summary (fresh copies)."""
    runs = [
        _run("r0", "mlp", "singd:diagonal", "bfloat16"),
        _run(
            "r1",
            "mlp",
            "kfac:cholesky",
            "bfloat16",
            diverged=True,
            first_nonfinite_step=40,
            nan_events=10,
            final_loss=None,
            accuracy=0.1,
            max_condition=None,
            failure_cause="precision",
            seeds_broken=1,
        ),
        _run("r2", "cnn", "singd:diagonal", "bfloat16", optimizer_state_bytes=98_304),
        _run("r3", "mlp", "singd:diagonal", "float32", control_of="r0", final_loss=0.40),
        _run("r4", "mlp", "kfac:cholesky", "float32", control_of="r1", final_loss=0.39),
    ]
    for run in runs[:2]:
        control = next(c for c in runs if c["control_of"] == run["run"])
        run["control"] = {"final_loss": control["final_loss"], "diverged": False}
    return copy.deepcopy(runs)


def write_run_dir(
    path: Path, runs: list[dict[str, Any]], config: dict[str, Any] | None = None
) -> Path:
    """Write ``runs`` as a run directory's summary.json and config.json; return ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    summary = {"schema": 1, "runs": runs}
    (path / "summary.json").write_text(json.dumps(summary, allow_nan=False), encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config or CONFIG), encoding="utf-8")
    return path


def find(runs: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """The run object with id ``run_id``."""
    return next(run for run in runs if run["run"] == run_id)


def seeded_runs(seeds: int, broken: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One configuration (MLP, KFAC, bfloat16) over ``seeds`` seeds, the first ``broken`` of
    which diverge, as a run directory's runs and config (seed counts consistent)."""
    runs = []
    for seed in range(seeds):
        figures: dict[str, Any] = {"seed": seed, "seeds_broken": broken, "seeds_total": seeds}
        if seed < broken:
            figures |= {"diverged": True, "first_nonfinite_step": 12, "nan_events": 38}
            figures |= {"final_loss": None, "accuracy": 0.1, "failure_cause": "optimization"}
        runs.append(_run(f"r{seed}", "mlp", "kfac:cholesky", "bfloat16", **figures))
    return runs, {**CONFIG, "seeds": list(range(seeds))}
