"""Memory against size: the storage formulas drawn as curves, measured bytes as points.

Two figures share this module. The report's *model scaling* section draws, per
structure, the bytes of one factor against its dimension d (``storage_entries(d)``
times the element size), and, per optimizer, the optimizer-state bytes of each suite
model widened 1x..256x against its parameter count (`precision_lab.memory`); the run's
measured bytes (every factor of every layer, every run's total) are drawn on the same
axes, so a reader sees whether the formula holds, and a slider reads off the bytes of a
wider model. ``precision-lab memory`` draws the per-category bars of one planned model
and, for the built-in models, the state against ``--d-model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from precision_lab.errors import UsageError
from precision_lab.memory import CATEGORIES, MemoryPlan, model_shape, state_bytes, widened_model
from precision_lab.report.page import Section
from precision_lab.specs import parse_spec
from singd.curvature import KFAC_ROLES, SINGD_ROLES
from singd.structures import get_structure

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

WIDTH_MULTIPLIERS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WORLD_SIZES = tuple(2**i for i in range(11))
"""Ranks the whole-model formulas are drawn per rank for (FSDP2 sharding, 1 to 1024)."""
DIMENSIONS = np.unique(np.geomspace(2, 65536, 49).astype(int))
BASE_STRUCTURES = ("dense", "diagonal")
# Element sizes of optimizer state: pure runs hold it in the run's dtype, mixed in fp32.
ITEMSIZE_LABEL = {4: "fp32 state (4 B)", 2: "fp16/bf16 state (2 B)"}
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
FACTOR_SIDE = {
    name: "k" if role.side == "input" else "c" for name, role in (SINGD_ROLES | KFAC_ROLES).items()
}
"""Each factor's side by its role (`singd.curvature`): ``k`` (d_K) or ``c`` (d_C)."""


def _itemsize(dtype: str, mode: str) -> int:
    return 4 if mode == "mixed" else torch.empty((), dtype=getattr(torch, dtype)).element_size()


def mb(nbytes: float) -> str:
    """Bytes as a short decimal figure: ``1.23 GB`` (1 GB = 1e9 B)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def _factor_structures(spec_text: str) -> dict[str, str]:
    """Factor name -> structure name for one optimizer spec (empty for AdamW/SGD)."""
    spec = parse_spec(spec_text)
    if spec.structures is None:
        return {}
    s_K, s_C = spec.structures
    if spec.family == "kfac":
        return dict.fromkeys(KFAC_ROLES, "dense")
    return {name: s_K if role.side == "input" else s_C for name, role in SINGD_ROLES.items()}


def _measured_factors(data: ReportData) -> pd.DataFrame:
    """Every recorded factor's bytes with its dimension, structure and itemsize."""
    rec = data.records
    rec = rec[(rec["probe"] == "memory") & (rec["metric"] == "bytes") & (rec["module"] != "")]
    rec = rec[rec["tensor"].isin(FACTOR_SIDE)]
    runs = data.summary.set_index("key")
    rows = []
    dims: dict[str, dict[str, tuple[int, int]]] = {}
    for key, g in rec.groupby("key"):
        run = runs.loc[key]
        if run["model"] not in dims:
            try:
                shape = model_shape(widened_model(run["model"], 1))
            except UsageError:
                dims[run["model"]] = {}
            else:
                dims[run["model"]] = {ly.name: (ly.dim_k, ly.dim_c) for ly in shape.layers}
        structures = _factor_structures(run["optimizer"])
        last = g[g["step"] == g["step"].max()]
        for r in last.itertuples():
            if r.module not in dims[run["model"]] or r.tensor not in structures:
                continue
            d_k, d_c = dims[run["model"]][r.module]
            rows.append(
                {
                    "key": key,
                    "dim": d_k if FACTOR_SIDE[r.tensor] == "k" else d_c,
                    "bytes": r.value,
                    "structure": structures[r.tensor],
                    "itemsize": _itemsize(run["dtype"], run.get("mode") or "pure"),
                    "label": f"{key} {r.module}.{r.tensor}",
                }
            )
    return pd.DataFrame(rows)


def _color(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def scaling_section(data: ReportData) -> Section:
    """Per-factor and whole-model optimizer-state memory against size, formula and
    measurement on the same axes, with a state-dtype selector and a width slider."""
    sec = Section(
        "scaling",
        "Model scaling: optimizer-state memory against size",
        "Lines are the storage formulas, markers the bytes this run measured (they sit on "
        "their line when the formula holds); left: one factor against its dimension d, "
        "right: a suite model widened 1x-256x; pick the model and state dtype above, drag the "
        "slider to read off a wider model, and the second to see one rank's state when the "
        "model is sharded with FSDP2 over 1 to 1024 ranks.",
    )
    s = data.summary
    if s.empty:
        sec.empty = "No runs in the summary, so there is nothing to place on the formulas."
        return sec
    specs = sorted({o for o in s["optimizer"].astype(str)})
    try:
        parsed = {o: parse_spec(o) for o in specs}
    except UsageError as err:
        sec.empty = f"The runs name an optimizer this version cannot plan: {err}"
        return sec
    models = sorted(m for m in s["model"].astype(str).unique())
    try:
        shapes = {m: [model_shape(widened_model(m, k)) for k in WIDTH_MULTIPLIERS] for m in models}
    except UsageError as err:
        sec.empty = f"The runs' models cannot be rebuilt for the formulas: {err}"
        return sec
    structures = list(BASE_STRUCTURES)
    for o in specs:
        for name in _factor_structures(o).values():
            if name not in structures:
                structures.append(name)
    s_color = _color(structures)
    o_color = {o: PALETTE[(len(structures) + i) % len(PALETTE)] for i, o in enumerate(specs)}
    itemsizes = (4, 2)
    fig = make_subplots(
        1,
        2,
        subplot_titles=["one factor: bytes vs dimension d", "whole model: state vs parameters"],
        horizontal_spacing=0.08,
    )
    # (itemsize, model or None for the per-factor panel) of each trace, for the selector
    groups: list[tuple[int, str | None]] = []
    formulas: list[tuple[int, int, str, str]] = []  # (trace, itemsize, model, spec), right
    for size in itemsizes:
        for name in structures:
            entries = np.array([get_structure(name).storage_entries(int(d)) for d in DIMENSIONS])
            fig.add_scatter(
                x=DIMENSIONS.astype(np.int32),
                y=(entries * size).astype(np.float64),
                mode="lines",
                name=f"{name} (formula)",
                legendgroup=f"s-{name}",
                line={"color": s_color[name]},
                hovertemplate=f"{name}, d=%{{x}}: %{{y:.4s}}B<extra></extra>",
                row=1,
                col=1,
            )
            groups.append((size, None))
        for model in models:
            params = [sh.params for sh in shapes[model]]
            for o in specs:
                totals = [
                    sum(state_bytes(parsed[o], sh, _dtype(size)).values()) for sh in shapes[model]
                ]
                fig.add_scatter(
                    x=np.array(params, dtype=np.float64),
                    y=np.array(totals, dtype=np.float64),
                    mode="lines",
                    name=f"{o} (formula)",
                    legendgroup=f"o-{o}",
                    line={"color": o_color[o]},
                    customdata=np.array(WIDTH_MULTIPLIERS),
                    hovertemplate=f"{o} · {model} ×%{{customdata}}: %{{x:.3s}} params, "
                    "%{y:.4s}B<extra></extra>",
                    row=1,
                    col=2,
                )
                formulas.append((len(fig.data) - 1, size, model, o))
                groups.append((size, model))
    measured = _measured_factors(data)
    modes = s["mode"] if "mode" in s else ["pure"] * len(s)
    notes = []
    for size in itemsizes:
        part = measured[measured["itemsize"] == size] if not measured.empty else measured
        for name, g in part.groupby("structure") if not part.empty else []:
            fig.add_scatter(
                x=g["dim"].to_numpy(np.int32),
                y=g["bytes"].to_numpy(np.float64),
                mode="markers",
                name=f"{name} (measured)",
                legendgroup=f"s-{name}",
                marker={"color": s_color[name], "symbol": "circle-open", "size": 10},
                text=g["label"],
                hovertemplate="%{text}: d=%{x}, %{y:.4s}B measured<extra></extra>",
                row=1,
                col=1,
            )
            groups.append((size, None))
        runs = s.assign(itemsize=[_itemsize(d, m) for d, m in zip(s["dtype"], modes, strict=True)])
        runs = runs[(runs["itemsize"] == size) & runs["optimizer_state_bytes"].notna()]
        for (o, model), g in runs.groupby(["optimizer", "model"]):
            x = [shapes[model][0].params] * len(g)
            fig.add_scatter(
                x=np.array(x, dtype=np.float64),
                y=g["optimizer_state_bytes"].to_numpy(np.float64),
                mode="markers",
                name=f"{o} (measured)",
                legendgroup=f"o-{o}",
                marker={"color": o_color[o], "symbol": "diamond-open", "size": 11},
                text=g["key"],
                hovertemplate="%{text}: %{x:.3s} params, %{y:.4s}B measured<extra></extra>",
                row=1,
                col=2,
            )
            groups.append((size, model))
    if measured.empty:
        notes.append("No per-factor bytes were recorded, so the left panel shows formulas only.")
    default = 2 if any(_itemsize(d, "pure") == 2 for d in s["dtype"]) else 4
    choices = [(model, size) for model in models for size in itemsizes]

    def visible(model: str, size: int) -> list[bool]:
        return [g_size == size and g_model in (None, model) for g_size, g_model in groups]

    for trace, shown in zip(fig.data, visible(models[0], default), strict=True):
        trace.visible = shown
    fig.update_layout(
        updatemenus=[
            {
                "type": "dropdown",
                "x": 0,
                "y": 1.17,
                "xanchor": "left",
                "active": choices.index((models[0], default)),
                "buttons": [
                    {
                        "label": f"{model} · {ITEMSIZE_LABEL[size]}",
                        "method": "restyle",
                        "args": [{"visible": visible(model, size)}],
                    }
                    for model, size in choices
                ],
            }
        ],
        sliders=[
            _width_slider(fig, models, specs, parsed, shapes),
            _world_slider(formulas, parsed, shapes),
        ],
    )
    fig.update_xaxes(type="log", exponentformat="power")
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_yaxes(title_text="bytes (B)", col=1)
    fig.update_xaxes(title_text="factor dimension d", col=1)
    fig.update_xaxes(title_text="model parameters", col=2)
    fig.update_layout(template="plotly_white", height=800, margin={"t": 150, "b": 300})
    sec.figure = fig
    sec.notes = notes
    return sec


def _dtype(itemsize: int) -> torch.dtype:
    return torch.float32 if itemsize == 4 else torch.bfloat16


def _world_slider(formulas: list[tuple[int, int, str, str]], parsed, shapes) -> dict:
    """A slider over `WORLD_SIZES`: each step redraws the right panel's formula lines as
    one rank's optimizer state when the model is sharded with FSDP2 over that many ranks
    (`precision_lab.memory.state_bytes`: the parameters' state sharded, each layer's
    factors on one rank, the most loaded rank shown); 1 is one process."""
    steps = []
    for world in WORLD_SIZES:
        ys = [
            np.array(
                [
                    sum(state_bytes(parsed[o], sh, _dtype(size), world, "fsdp").values())
                    for sh in shapes[model]
                ],
                dtype=np.float64,
            )
            for _, size, model, o in formulas
        ]
        steps.append(
            {
                "label": str(world),
                "method": "restyle",
                "args": [{"y": ys}, [index for index, *_ in formulas]],
            }
        )
    return {
        "active": 0,
        "steps": steps,
        "currentvalue": {"prefix": "ranks (FSDP2, one rank's state, lines): "},
        # Above the right panel: below the plots the width slider and its note take the room.
        "x": 0.54,
        "len": 0.46,
        "y": 1.3,
        "yanchor": "top",
        "pad": {"t": 0, "b": 0},
    }


def _width_slider(fig, models, specs, parsed, shapes) -> dict:
    """A slider over the width multipliers; each step draws a line at each model's
    parameter count and lists its optimizer-state bytes (fp32 and 16-bit state)."""
    titles = list(fig.layout.annotations)
    steps = []
    for i, k in enumerate(WIDTH_MULTIPLIERS):
        lines, shapes_at = [], []
        for model in models:
            sh = shapes[model][i]
            cells = [
                f"{o} {mb(sum(state_bytes(parsed[o], sh, torch.float32).values()))}"
                f" / {mb(sum(state_bytes(parsed[o], sh, torch.bfloat16).values()))}"
                for o in specs
            ]
            rows = [", ".join(cells[i : i + 4]) for i in range(0, len(cells), 4)]
            lines.append(f"<b>{model} ×{k}</b> ({sh.params:.3g} params): " + "<br>   ".join(rows))
            shapes_at.append(
                {
                    "type": "line",
                    "xref": "x2",
                    "yref": "y2 domain",
                    "x0": sh.params,
                    "x1": sh.params,
                    "y0": 0,
                    "y1": 1,
                    "line": {"dash": "dot", "color": "#555", "width": 1},
                }
            )
        note = {
            "text": "state fp32 / 16-bit: " + "<br>".join(lines),
            "xref": "paper",
            "yref": "paper",
            "x": 0,
            "y": -0.5,
            "xanchor": "left",
            "yanchor": "top",
            "align": "left",
            "showarrow": False,
            "font": {"size": 11},
        }
        steps.append(
            {
                "label": f"×{k}",
                "method": "relayout",
                "args": [{"shapes": shapes_at, "annotations": [*titles, note]}],
            }
        )
    fig.update_layout(
        shapes=steps[0]["args"][0]["shapes"], annotations=steps[0]["args"][0]["annotations"]
    )
    return {
        "active": 0,
        "steps": steps,
        "currentvalue": {"prefix": "width multiplier: "},
        "y": -0.14,
        "len": 1.0,
    }


# --------------------------------------------------------------------------------------
# precision-lab memory
# --------------------------------------------------------------------------------------


def plan_figure(
    plan: MemoryPlan, sweep: list[tuple[int, MemoryPlan]] | None, plan_width: int = 0
) -> go.Figure:
    """Bars of bytes by category per optimizer for the planned model; beside them, where
    ``sweep`` holds plans of the same model at other ``--d-model`` values, each
    optimizer's total state against ``d_model`` (log-log), the planned width dotted."""
    specs = list(plan.rows)
    cols = 2 if sweep else 1
    fig = make_subplots(
        1,
        cols,
        subplot_titles=["state by category", "total state vs --d-model"][:cols],
        column_widths=[0.5, 0.5][:cols],
    )
    for category in CATEGORIES:
        values = [plan.rows[o][category] for o in specs]
        if not any(values):
            continue
        fig.add_bar(
            x=specs,
            y=np.array(values, dtype=np.float64),
            name=category,
            hovertemplate=f"{category}: %{{y:.4s}}B<extra></extra>",
            row=1,
            col=1,
        )
    colors = _color(specs)
    if sweep:
        widths = np.array([w for w, _ in sweep], dtype=np.float64)
        for o in specs:
            fig.add_scatter(
                x=widths,
                y=np.array([p.total(o) for _, p in sweep], dtype=np.float64),
                mode="lines+markers",
                name=o,
                line={"color": colors[o]},
                hovertemplate=f"{o}, d_model=%{{x}}: %{{y:.4s}}B<extra></extra>",
                row=1,
                col=2,
            )
        fig.add_shape(
            type="line",
            xref="x2",
            yref="y2 domain",
            x0=plan_width,
            x1=plan_width,
            y0=0,
            y1=1,
            line={"dash": "dot", "color": "#555", "width": 1},
        )
        fig.update_xaxes(type="log", title_text="--d-model", row=1, col=2)
        fig.update_yaxes(type="log", exponentformat="power", row=1, col=2)
    # SI prefixes: plotly's default writes 1e9 as "1B", which reads as one byte here.
    fig.update_yaxes(title_text="bytes (B)", exponentformat="SI", row=1, col=1)
    fig.update_layout(template="plotly_white", barmode="stack", height=520)
    return fig
