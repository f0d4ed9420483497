"""Run directories with the real schema (summary.json, config.json, records.parquet) for
report tests: written through `probes.records`, with values drawn from a seeded RNG that
imitate what the stress suite records (a loss that falls, condition numbers that grow,
one run that breaks with NaNs). Tests of the figures against real runs use
``precision-lab stress`` itself; these make the report's inputs small and controllable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from precision_lab.memory import model_shape, state_bytes, widened_model
from probes.records import Recorder, finite_or_none, write_parquet
from singd.structures import get_structure

LAYERS = ("0", "2", "4")  # the MLP's Linear layers
FACTORS = {"singd": ("K", "C"), "kfac": ("A", "G")}


def _family(optimizer: str) -> str:
    return optimizer.split(":")[0]


def make_run_dir(
    path: Path,
    *,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    optimizers: tuple[str, ...] = ("singd:diagonal", "kfac:cholesky", "adamw"),
    scenarios: tuple[str, ...] = ("baseline", "large-lr"),
    models: tuple[str, ...] = ("mlp",),
    steps: int = 60,
    broken: tuple[str, str, str] | None = ("kfac:cholesky", "bfloat16", "large-lr"),
    break_step: int = 23,
    seed: int = 0,
) -> Path:
    """Write a run directory of the cross product, every run of one seed.

    Args:
        broken: (optimizer, dtype, scenario) of the runs that produce NaN from
            ``break_step`` on, or None.

    Returns:
        ``path``.
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    runs, rows = [], Recorder()
    for model in models:
        for scenario in scenarios:
            for optimizer in optimizers:
                for dtype in dtypes:
                    run = f"{model}-{scenario}-{optimizer.replace(':', '_')}-{dtype}-s{seed}"
                    bad = broken == (optimizer, dtype, scenario)
                    runs.append(
                        _one_run(
                            rows,
                            rng,
                            run,
                            model,
                            scenario,
                            optimizer,
                            dtype,
                            steps,
                            break_step if bad else None,
                            seed,
                        )
                    )
    frame = rows.to_frame()
    write_parquet(frame, path / "records.parquet")
    (path / "summary.json").write_text(json.dumps({"schema": 1, "runs": runs}, indent=1))
    config = {
        "suite": {"name": "synthetic", "steps": steps},
        "optimizers": list(optimizers),
        "dtypes": list(dtypes),
        "modes": ["pure"],
        "seeds": [seed],
        "versions": {"python": "3.11", "torch": "2.13.0", "precision_lab": "0.1.0"},
        "device": "cpu",
        "command": "precision-lab stress --suite synthetic",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def _one_run(
    rec: Recorder,
    rng: np.random.Generator,
    run: str,
    model: str,
    scenario: str,
    optimizer: str,
    dtype: str,
    steps: int,
    break_at: int | None,
    seed: int,
) -> dict:
    rec.run = run
    family = _family(optimizer)
    itemsize = 4 if dtype == "float32" else 2
    eps = {"float32": 1.2e-7, "bfloat16": 7.8e-3, "float16": 9.8e-4}[dtype]
    loss0 = 2.3
    max_cond = 0.0
    last = steps - 1 if break_at is None else break_at
    for step in range(steps):
        dead = break_at is not None and step >= break_at
        loss = float("nan") if dead else loss0 * np.exp(-step / 40) * (1 + 0.05 * rng.random())
        rec.add(step, "train", "loss", loss, tensor="loss")
        if step % 10 == 0 or step == steps - 1:
            acc = float("nan") if dead else min(0.97, 0.1 + step / steps)
            rec.add(step, "train", "test_accuracy", acc, tensor="accuracy")
        rec.add(step, "time", "step_time_ms", 3 + rng.random(), tensor="step", unit="ms")
        for layer in LAYERS:
            nan = 5.0 if dead else 0.0
            for tensor in ("activation", "grad"):
                rec.add(
                    step, "numerics", "nan_count", nan, module=layer, tensor=tensor, dtype=dtype
                )
                rec.add(
                    step,
                    "numerics",
                    "underflow_fraction",
                    eps * rng.random() * (10 if tensor == "grad" else 1),
                    module=layer,
                    tensor=tensor,
                    dtype=dtype,
                )
                rec.add(
                    step,
                    "numerics",
                    "overflow_risk_fraction",
                    (1e-3 if dead else 0.0),
                    module=layer,
                    tensor=tensor,
                    dtype=dtype,
                )
            if family not in FACTORS or step % 5:
                continue
            for factor in FACTORS[family]:
                cond = float("nan") if dead else 10 ** (1 + step / steps * 3 + rng.random())
                max_cond = max(max_cond, cond) if not np.isnan(cond) else max_cond
                rec.add(
                    step,
                    "condition",
                    "condition_number",
                    cond,
                    module=layer,
                    tensor=factor,
                    dtype=dtype,
                )
            err = float("nan") if dead else eps * 10 ** rng.normal(0, 0.3)
            rec.add(
                step,
                "condition",
                "precond_rel_error",
                err,
                module=layer,
                tensor="update",
                dtype=dtype,
            )
        if break_at == step:
            rec.add(
                step, "numerics", "first_nonfinite", step, module="0", tensor="grad", dtype=dtype
            )
    shape = model_shape(widened_model(model, 1))
    categories = state_bytes(optimizer, shape, getattr(torch, dtype))
    for category, nbytes in categories.items():
        rec.add(last, "memory", "bytes", nbytes, tensor=category, unit="B")
    state = sum(categories.values())
    rec.add(last, "memory", "bytes", state, tensor="total", unit="B")
    adamw = sum(state_bytes("adamw", shape, getattr(torch, dtype)).values())
    rec.add(last, "memory", "adamw_state_bytes", adamw, tensor="total", unit="B")
    structures = {"singd:diagonal": "diagonal", "kfac:cholesky": "dense"}.get(optimizer)
    names = ("K", "C", "m_K", "m_C") if family == "singd" else ("A", "G", "A_inv", "G_inv")
    for layer in shape.layers if structures else ():
        for name in names:
            d = layer.dim_k if name in ("K", "m_K", "A", "A_inv") else layer.dim_c
            nbytes = get_structure(structures).storage_entries(d) * itemsize
            rec.add(last, "memory", "bytes", nbytes, module=layer.name, tensor=name, unit="B")
    return {
        "run": run,
        "model": model,
        "scenario": scenario,
        "optimizer": optimizer,
        "structure": optimizer.split(":")[1] if ":" in optimizer else None,
        "dtype": dtype,
        "mode": "pure",
        "seed": seed,
        "control_of": None,
        "steps": steps,
        "finished": True,
        "diverged": break_at is not None,
        "first_nonfinite_step": break_at,
        "nan_events": 0 if break_at is None else steps - break_at,
        "inf_events": 0,
        "skipped_steps": 0,
        "overflow_events": 0,
        "underflow_fraction": 10 * eps,
        "max_condition": finite_or_none(max_cond) if family in FACTORS else None,
        "optimizer_state_bytes": state,
        "peak_memory_bytes": 200e6 + 1e6 * rng.random(),
        "peak_tensor_bytes": int(3 * state + 1e5 * rng.random()),
        "final_loss": None if break_at is not None else 0.5,
        "accuracy": None if break_at is not None else 0.9,
        "step_time_ms": 3.5,
        "failure_cause": "precision" if break_at is not None else "none",
        "fallback_optimizer": "adamw",
        "control": None,
    }
