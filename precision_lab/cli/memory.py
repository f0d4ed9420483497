"""``precision-lab memory``: optimizer-state memory per optimizer, from storage formulas.

The command parses, calls `precision_lab.memory.plan_memory` and prints a table (and,
with ``-o``, an HTML plot). Exit codes: 0 success, 2 usage or input error (one sentence
on stderr, no traceback).
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from rich.box import SIMPLE_HEAD
from rich.table import Table

from precision_lab.cli.context import LabContext, pass_lab
from precision_lab.cli.params import DTYPE, SPECS
from precision_lab.dtypes import dtype_name
from precision_lab.errors import UsageError, user_errors
from precision_lab.memory import (
    CATEGORIES,
    DEFAULT_SPECS,
    SHARDINGS,
    build_meta_model,
    plan_memory,
    state_bytes,
)
from precision_lab.report.page import Section, render_page
from precision_lab.report.scaling import plan_figure
from precision_lab.specs import OptimizerSpec

UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1))
"""Decimal byte units (1 GB = 1e9 B), largest first."""

SWEEP_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
MAX_WORLD_SIZE = 2**20
"""Most ranks --world-size takes (today's largest jobs are near 2**15 devices)."""
"""``--d-model`` multiples drawn in the memory command's HTML plot."""


@click.command("memory")
@click.option(
    "--model",
    default="transformer",
    show_default=True,
    help="mlp, cnn, transformer, or module:factory (called without arguments).",
)
@click.option(
    "--d-model",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Width: MLP hidden width, CNN first channel count, transformer model dimension.",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    help="MLP hidden layers or transformer blocks [default: 2 and 1].",
)
@click.option("--heads", type=click.IntRange(min=1), help="Transformer heads [default: d/64].")
@click.option(
    "--dtype",
    type=DTYPE,
    default="fp32",
    show_default=True,
    help="dtype of the optimizer state: fp32, fp16, bf16 (or torch names).",
)
@click.option(
    "--optimizers",
    type=SPECS,
    default=",".join(DEFAULT_SPECS),
    show_default=True,
    help="Comma-separated optimizer specs to compare.",
)
@click.option(
    "--world-size",
    type=click.IntRange(min=1, max=MAX_WORLD_SIZE),
    default=1,
    show_default=True,
    help="Ranks the model is trained on: the table shows one rank's bytes.",
)
@click.option(
    "--sharding",
    type=click.Choice(SHARDINGS),
    default="fsdp",
    show_default=True,
    help="ddp: every rank holds the whole state; fsdp (FSDP2 fully_shard): the "
    "parameters' state sharded, each layer's factors on one rank (the most loaded shown).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write an HTML plot to this file.",
)
@pass_lab
@user_errors
def memory_command(
    lab: LabContext,
    model: str,
    d_model: int,
    layers: int | None,
    heads: int | None,
    dtype: torch.dtype,
    optimizers: list[OptimizerSpec],
    world_size: int,
    sharding: str,
    output: Path | None,
) -> None:
    """Optimizer-state memory per optimizer and structure, from layer shapes and storage
    formulas, without allocating the model's weights."""
    specs = optimizers
    meta = build_meta_model(model, d_model, layers, heads)
    plan = plan_memory(meta, dtype, specs, world_size, sharding)
    shape = plan.shape
    adamw = sum(state_bytes("adamw", shape, dtype, world_size, sharding).values())
    where = f", per rank of {world_size} ({sharding})" if world_size > 1 else ""
    table = Table(
        box=SIMPLE_HEAD,
        title=f"Optimizer state of {model} (d_model {d_model}): {shape.params:,} parameters, "
        f"{len(shape.layers)} Kronecker-factored layers, state in {dtype_name(dtype)}{where}",
        caption="Decimal units (1 GB = 1e9 B). fallback: AdamW state of the parameters "
        "SINGD and KFAC do not cover (norms, embeddings, attention).",
    )
    # One unit for the whole table keeps the numbers short; all-zero columns are dropped.
    largest = max(sum(row.values()) for row in plan.rows.values())
    unit, scale = next((u, f) for u, f in UNITS if largest >= f or f == 1)
    columns = [c for c in CATEGORIES if any(row[c] for row in plan.rows.values())]
    # Numbers never truncate (min_width); headers wrap and long names fold instead.
    table.add_column("optimizer", overflow="fold")
    for category in columns:
        table.add_column(f"{category.replace('_', ' ')} ({unit})", justify="right", min_width=6)
    table.add_column(f"total ({unit})", justify="right", style="bold", min_width=6)
    table.add_column("vs AdamW", justify="right", min_width=5)
    for spec, row in plan.rows.items():
        total = sum(row.values())
        table.add_row(
            spec,
            *(f"{row[c] / scale:.3g}" if row[c] else "-" for c in columns),
            f"{total / scale:.3g}",
            f"{total / adamw:.2f}x",
        )
    lab.console.print(table)
    if output is None:
        return
    sweep = None
    if ":" not in model:
        sweep = []
        for factor in SWEEP_FACTORS:
            width = max(1, round(d_model * factor))
            if model == "transformer" and width % (heads or max(1, width // 64)):
                continue
            meta = build_meta_model(model, width, layers, heads)
            sweep.append((width, plan_memory(meta, dtype, specs)))
    section = Section(
        "memory-plan",
        f"Optimizer state of {model}, d_model {d_model}, {dtype_name(dtype)}",
        "Left: each optimizer's state stacked by category for this model; right: total "
        "state as --d-model grows (log-log), from the same formulas.",
        figure=plan_figure(plan, sweep, d_model),
    )
    title = f"precision-lab memory: {model} d_model {d_model}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render_page(title, [section]), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"Cannot write the plot to {str(output)!r} ({err.strerror}).") from None
    lab.console.print(f"Plot written: {output}")
