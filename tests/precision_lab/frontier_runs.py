"""Run directories of frontiers (DESIGN.md, docs/suites.md), for the gate and report tests.

Each rung of a frontier is an ordinary run (scenario ``"<knob>=<value>"``, fields
``frontier`` and ``knob_value``) beside its float32 control, as ``precision-lab stress``
writes them. What each rung did is given as a pattern, one letter per rung: ``H`` held
(did not break, learned), ``B`` broke (diverged), ``N`` did not learn (did not break, did
not learn), ``M`` missing (planned, never finished).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probes.records import Recorder, write_parquet
from tests.precision_lab.gate_runs import CONFIG, _run, write_run_dir

DAMPING = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
"""A damping ladder, mildest first."""

FRONTIER_CONFIG = {**CONFIG, "suite": "frontier-test"}


def _figures(letter: str, steps: int) -> dict[str, Any]:
    if letter == "B":
        return {
            "diverged": True,
            "first_nonfinite_step": 12,
            "nan_events": steps - 12,
            "final_loss": None,
            "accuracy": 0.1,
            "learned": False,
            "max_condition": None,
        }
    if letter == "N":
        return {"final_loss": 2.3, "accuracy": 0.09, "learned": False}
    if letter == "M":
        return {"finished": False, "steps": 0, "final_loss": None, "accuracy": None}
    return {"learned": True}


def frontier_runs(
    patterns: dict[str, tuple[str, str]],
    *,
    model: str = "mlp",
    knob: str = "damping",
    ladder: tuple[float, ...] = DAMPING,
    dtype: str = "bfloat16",
    seed: int = 0,
    steps: int = 50,
) -> list[dict[str, Any]]:
    """The runs of one frontier per optimizer, with their float32 controls.

    Args:
        patterns: per optimizer spec, ``(dtype's pattern, control's pattern)``, one letter
            per rung of ``ladder`` (module docstring).

    Returns:
        Run objects of DESIGN.md's schema (each rung's run, then its control).
    """
    runs = []
    for optimizer, (pattern, control_pattern) in patterns.items():
        assert len(pattern) == len(control_pattern) == len(ladder), (optimizer, pattern)
        for value, letter, control_letter in zip(ladder, pattern, control_pattern, strict=True):
            scenario = f"{knob}={value:g}"
            run_id = f"{model}/{scenario}/{optimizer}/{dtype}/pure/s{seed}"
            common = {"scenario": scenario, "seed": seed, "frontier": knob, "knob_value": value}
            control_id = f"{run_id}/control-float32-pure"
            control = _run(
                control_id,
                model,
                optimizer,
                "float32",
                control_of=run_id,
                **common,
                **_figures(control_letter, steps),
            )
            run = _run(run_id, model, optimizer, dtype, **common, **_figures(letter, steps))
            run["failure_cause"] = _cause(letter, control_letter)
            run["control"] = {"run": control_id, "diverged": control["diverged"]}
            runs += [run, control]
    return runs


def _cause(letter: str, control_letter: str) -> str | None:
    if letter == "M" or control_letter == "M":
        return None
    if letter != "B":
        return "none"
    return {"B": "optimization", "N": "no_learning", "H": "precision"}[control_letter]


def seeds_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` with ``seeds_total`` and ``seeds_broken`` counted per configuration, as the
    stress suite writes them."""
    configs: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        key = (
            run["model"],
            run["scenario"],
            run["optimizer"],
            run["dtype"],
            run["control_of"] and "control",
        )
        configs.setdefault(key, []).append(run)
    for group in configs.values():
        for run in group:
            run["seeds_total"] = len(group)
            run["seeds_broken"] = sum(bool(r["diverged"]) for r in group)
    return runs


def write_frontier_dir(
    path: Path, runs: list[dict[str, Any]], *, seeds: list[int] | None = None, records: bool = False
) -> Path:
    """A run directory of ``runs`` (summary.json, config.json) and, with ``records``, a
    records.parquet with each run's loss and, for the Kronecker optimizers, a condition
    number per factor over 10 steps (what the per-step figures draw)."""
    config = {**FRONTIER_CONFIG, "seeds": seeds or sorted({run["seed"] for run in runs})}
    write_run_dir(path, seeds_of(runs), config)
    if records:
        rows = Recorder()
        rng = np.random.default_rng(0)
        for run in runs:
            rows.run = run["run"]
            for step in range(10):
                loss = float("nan") if run["diverged"] and step > 5 else 2.3 * 0.9**step
                rows.add(step, "train", "loss", loss, tensor="loss")
                if run["optimizer"].startswith("kfac"):
                    for factor in ("A", "G"):
                        cond = 10 ** (2 + step / 5 + rng.random())
                        rows.add(
                            step,
                            "condition",
                            "condition_number",
                            cond,
                            module="0",
                            tensor=factor,
                            dtype=run["dtype"],
                        )
        write_parquet(rows.to_frame(), path / "records.parquet")
    return path
