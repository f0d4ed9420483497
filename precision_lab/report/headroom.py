"""Distance to failure: per run, a heatmap of layers x steps of the smallest headroom, in
powers of two, between the run's readings and its dtype's limits.

Readings (docs/CONTRACTS.md), each judged against the limits of the dtype the tensor was
held in (the row's ``dtype``; the run's where a row has none), with ``max`` the largest
finite number, ``tiny`` the smallest normal one and ``eps`` the machine epsilon:

- ``numerics`` ``amax`` (largest finite ``|x|`` of a watched tensor: activations, output
  gradients, weights, gradients, updates, factors, momenta): ``log2(max / amax)``,
  the doublings left before it overflows;
- ``numerics`` ``min_nonzero`` (smallest nonzero ``|x|``) of the state a run keeps (the
  factors, momenta and weights): ``log2(min_nonzero / tiny)``, the halvings left before
  it turns subnormal (negative: it already is). A value of that state flushed to zero
  stays lost; one gradient or activation entry below ``tiny`` costs that step at most
  ``tiny`` in absolute terms (every saturated softmax makes some, float32 included), so
  those are judged on overflow alone (the report's range section shows their underflow
  fractions);
- ``condition`` ``condition_number`` of each factor the optimizer keeps and inverts or
  multiplies by (SINGD's ``K``, ``C``; KFAC's ``A``, ``G``, damped as inverted; their
  inverses and SINGD's products ``K K^T`` share or square those condition numbers and are
  left out): ``log2(1 / (eps kappa))``, the factors of two before rounding to the dtype
  can make the factor singular;
- a NaN or Inf in any watched tensor of the layer: no headroom at all (drawn at the bottom
  of the scale, marked ``NaN/Inf``).

A cell is the smallest of these over the layer's tensors (a parameter's ``weight``,
``grad``, ``update`` and ``momentum`` count for the layer that owns it) at one recorded
step; hovering names the tensor and the reading. ``precision="auto"`` escalates a factor
at 4 binades of range headroom and at ``kappa eps > 1/8`` (3 powers of two of condition
headroom), so cells at or below 4 are about where it acts (its range bounds read a
factor's largest entry and smallest diagonal entry, not its smallest entry); cells below
0 are past the dtype's limit. Runs are offered worst first (smallest headroom anywhere, then the
earliest step where it was reached) in a dropdown, at most `MAX_RUNS` of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from precision_lab.report.page import Section
from singd.curvature import KFAC_ROLES, SINGD_ROLES

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

MAX_RUNS = 40
"""Runs offered in the dropdown, worst first."""
LOW, HIGH = -8.0, 32.0
"""The colour scale's range, powers of two; cells beyond it take its end colours."""
NONFINITE_METRICS = ("nan_count", "posinf_count", "neginf_count")
PARAMETER_TENSORS = ("weight", "grad", "update", "momentum")
"""Watched tensors named by their parameter (``0.weight``), counted for its layer (``0``)."""
KEPT = (*SINGD_ROLES, *KFAC_ROLES, "weight", "momentum")
"""Tensors whose smallest nonzero value is judged against the smallest normal number."""
CONDITIONED = tuple(
    name
    for name, role in (SINGD_ROLES | KFAC_ROLES).items()
    if role.kind in ("preconditioner", "statistic")
)
READING_NAMES = {
    "amax": "largest |value| vs max",
    "min_nonzero": "smallest nonzero |value| vs smallest normal",
    "condition_number": "condition number vs 1/eps",
    "nonfinite": "NaN/Inf",
}
# Red below 0 (past the limit), orange up to 4 (where escalation acts), then to green.
_STOPS = [(LOW, "#67000d"), (0.0, "#ef3b2c"), (4.0, "#fd8d3c"), (8.0, "#fee391"), (HIGH, "#1a9850")]
COLORSCALE = [[(v - LOW) / (HIGH - LOW), c] for v, c in _STOPS]


LIMITS = ("max", "tiny", "eps")


def _limits(dtype: str) -> tuple[float, float, float]:
    """`LIMITS` of a dtype named as the records name it."""
    info = torch.finfo(getattr(torch, dtype))
    return info.max, info.tiny, info.eps


def headroom_readings(data: ReportData) -> pd.DataFrame:
    """Every reading's headroom: columns ``key``, ``layer``, ``step``, ``tensor``,
    ``reading`` (a `READING_NAMES` key) and ``headroom`` (powers of two; ``-inf`` for a
    NaN/Inf)."""
    rec = data.records
    numerics = (rec["probe"] == "numerics") & (
        rec["metric"].isin(("amax", *NONFINITE_METRICS))
        | ((rec["metric"] == "min_nonzero") & rec["tensor"].isin(KEPT))
    )
    condition = (
        (rec["probe"] == "condition")
        & (rec["metric"] == "condition_number")
        & rec["tensor"].isin(CONDITIONED)
    )
    rec = rec[numerics | condition]
    columns = ["key", "layer", "step", "tensor", "reading", "headroom"]
    if rec.empty:
        return pd.DataFrame(columns=columns)
    rec = rec.astype({c: str for c in rec.select_dtypes("category").columns})
    run_dtype = rec["key"].map(data.summary.set_index("key")["dtype"])
    dtype = rec["dtype"].where(rec["dtype"] != "", run_dtype)
    table = {d: _limits(d) for d in dtype.unique()}
    limits = pd.DataFrame(
        {name: dtype.map({d: v[i] for d, v in table.items()}) for i, name in enumerate(LIMITS)}
    )
    value = rec["value"].astype(float)
    metric = rec["metric"]
    with np.errstate(divide="ignore", invalid="ignore"):
        headroom = np.select(
            [
                metric == "amax",
                metric == "min_nonzero",
                metric == "condition_number",
            ],
            [
                np.log2(limits["max"] / value.where(value > 0)),
                np.log2(value / limits["tiny"]),
                # A non-finite condition number: the factor is singular in its dtype.
                np.where(np.isfinite(value), -np.log2(limits["eps"] * value), -np.inf),
            ],
            default=np.where(value > 0, -np.inf, np.nan),  # NaN/Inf counts
        )
    reading = metric.where(~metric.isin(NONFINITE_METRICS), "nonfinite")
    owned = rec["tensor"].isin(PARAMETER_TENSORS) & rec["module"].str.contains(".", regex=False)
    layer = rec["module"].where(~owned, rec["module"].str.rsplit(".", n=1).str[0])
    out = pd.DataFrame(
        {
            "key": rec["key"],
            "layer": layer,
            "step": rec["step"].astype(int),
            "tensor": rec["tensor"],
            "reading": reading,
            "headroom": headroom,
        }
    )
    return out[out["headroom"].notna() & (out["layer"] != "")][columns]


def headroom_cells(data: ReportData) -> pd.DataFrame:
    """The smallest headroom per (run ``key``, ``layer``, ``step``), with the ``tensor``
    and ``reading`` that gave it."""
    readings = headroom_readings(data)
    if readings.empty:
        return readings
    smallest = readings.groupby(["key", "layer", "step"])["headroom"].idxmin()
    return readings.loc[smallest].reset_index(drop=True)


def _layer_order(layers: list[str]) -> list[str]:
    """Model order for numeric names (``0``, ``2``, ``10``), else alphabetical."""

    def key(name: str) -> tuple:
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))

    return sorted(layers, key=key)


def _run_trace(key: str, cells: pd.DataFrame, visible: bool) -> dict:
    layers = _layer_order(list(cells["layer"].unique()))
    steps = sorted(cells["step"].unique())
    z = np.full((len(layers), len(steps)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hover = np.full(z.shape, "", dtype=object)
    for c in cells.itertuples():
        i, j = layers.index(c.layer), steps.index(c.step)
        h = c.headroom
        z[i, j] = LOW if h == -math.inf else min(max(h, LOW), HIGH)
        text[i, j] = "NaN/Inf" if h == -math.inf else f"{h:.0f}"
        shown = "none (NaN/Inf)" if h == -math.inf else f"2^{h:.1f}"
        hover[i, j] = f"{c.tensor}: {READING_NAMES[c.reading]}, headroom {shown}"
    few = z.size <= 600
    return {
        "type": "heatmap",
        "x": [str(s) for s in steps],
        "y": layers,
        "z": np.where(np.isnan(z), None, z).tolist(),
        "zmin": LOW,
        "zmax": HIGH,
        "colorscale": COLORSCALE,
        "colorbar": {"title": "headroom<br>(powers of 2)"},
        "text": text.tolist() if few else None,
        "texttemplate": "%{text}" if few else None,
        "customdata": hover.tolist(),
        "hovertemplate": "layer %{y} · step %{x}<br>%{customdata}<extra></extra>",
        "xgap": 1,
        "ygap": 1,
        "visible": visible,
        "name": key,
    }


def headroom_heatmap(data: ReportData) -> Section:
    """Per run (dropdown, worst first), layers x steps of the smallest headroom to the
    dtype's limits (module doc)."""
    sec = Section(
        "headroom",
        "Distance to failure: headroom to the dtype's limits",
        "Per run, each cell is the smallest headroom, in powers of two, at one recorded step "
        "of one layer: largest |value| against the dtype's maximum, smallest nonzero "
        "against its smallest normal number, factor condition number against 1/eps. Red "
        '(below 0) is past a limit; orange (up to 4) is where precision="auto" would '
        "widen a factor. Pick a run in the menu; the worst runs come first.",
    )
    cells = headroom_cells(data)
    if cells.empty:
        sec.empty = "No range or condition readings were recorded (the numerics probe was off)."
        return sec
    # Worst first: the smallest headroom anywhere, then the earliest step it was reached.
    worst = cells.sort_values(["headroom", "step"]).groupby("key", sort=False).first()
    order = worst.sort_values(["headroom", "step"]).index.tolist()
    shown = order[:MAX_RUNS]
    traces = []
    buttons = []
    by_key = dict(list(cells.groupby("key")))
    for i, key in enumerate(shown):
        traces.append(_run_trace(key, by_key[key], visible=i == 0))
        h = worst.loc[key, "headroom"]
        least = "NaN/Inf" if h == -math.inf else f"{h:.0f}"
        label = key if len(data.sources) > 1 else key.split("/", 1)[1]
        buttons.append(
            {
                "label": f"{label} (least {least} at step {int(worst.loc[key, 'step'])})",
                "method": "update",
                "args": [{"visible": [j == i for j in range(len(shown))]}],
            }
        )
    layers = max(len(t["y"]) for t in traces)
    longest = max(len(name) for t in traces for name in t["y"])
    layout = {
        "template": "plotly_white",
        # Room for the longest layer name (about 7 px a character at the axis' font size).
        "margin": {"l": 40 + 7 * longest, "r": 20, "t": 90, "b": 50},
        "height": max(320, 160 + 28 * layers),
        "xaxis": {"title": {"text": "step"}, "type": "category"},
        "yaxis": {"title": {"text": "layer"}, "type": "category", "autorange": "reversed"},
        "updatemenus": [
            {"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.18, "yanchor": "top"}
        ],
    }
    sec.figure = {"data": traces, "layout": layout}
    if len(order) > MAX_RUNS:
        sec.notes = [f"The menu lists the {MAX_RUNS} worst of {len(order)} runs."]
    return sec
