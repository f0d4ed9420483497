"""The report's figures, each built from the summary and the records as Plotly figures.

Every builder takes the `precision_lab.report.ReportData` of one or several run
directories and returns a `Section`: a figure with a one-line caption, or a sentence
saying why there is nothing to draw. Runs are keyed by ``source/run`` so that two run
directories of the same suite stay apart; where there are several sources, trace names
carry the source's label.

Display values are float32 (Plotly embeds numpy arrays as base64, about 5.3 characters
per value) and long traces are thinned by `Thinning`, which keeps each bucket's smallest
and largest value so that spikes survive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from precision_lab.report.page import Section
from precision_lab.run.summary import MEMORY_STEPS
from singd.curvature import KFAC_ROLES, SINGD_ROLES

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

POINTS_PER_FIGURE = 24_000
"""Display budget per line figure (points); the page stays under 8 MB with plotly.js."""

MAX_POINTS_PER_TRACE = 400
MIN_POINTS_PER_TRACE = 60

SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
DTYPE_COLORS = {"float32": "#1f77b4", "bfloat16": "#d62728", "float16": "#ff7f0e"}
FACTORS = SINGD_ROLES | KFAC_ROLES
"""Every factor the optimizers name, with its role (`singd.curvature.FactorRole`)."""
_DASH = {("input", False): "solid", ("output", False): "dash"}
_DASH |= {("input", True): "dot", ("output", True): "dashdot"}
FACTOR_DASH = {
    name: _DASH[role.side, role.kind == "inverse"]
    for name, role in FACTORS.items()
    if role.kind != "momentum"
}
"""Line style of each condition-number reading, by the factor's side and whether it is an
inverse; the condition probe's products ``K K^T`` and ``C C^T`` (SINGD's preconditioner
inverses) are drawn as KFAC's inverses are."""
FACTOR_DASH |= {"KKT": "dot", "CCT": "dashdot"}
NOT_STACKED = ("total", "factors", "momenta", "inverses")
"""Memory categories drawn through their per-layer factors instead (or not at all)."""
SEGMENT_COLORS = {
    "K": "#1f77b4",
    "A": "#1f77b4",
    "C": "#ff7f0e",
    "G": "#ff7f0e",
    "m_K": "#aec7e8",
    "A_inv": "#aec7e8",
    "m_C": "#ffbb78",
    "G_inv": "#ffbb78",
    "param_buffers": "#2ca02c",
    "momentum_buffer": "#2ca02c",
    "fallback": "#9467bd",
    "accumulators": "#e377c2",
    "exp_avg": "#17becf",
    "exp_avg_sq": "#9edae5",
    "step": "#7f7f7f",
}
"""Stacked memory segments: K-side factors blue, C-side orange, their momenta or
inverses lighter, heavy-ball buffers green."""
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 40, "b": 50}}


def dtype_short(name: str) -> str:
    """``bfloat16`` -> ``bf16``; other names unchanged."""
    return SHORT_DTYPE.get(name, name)


def inverse_eps(dtype: str) -> float:
    """1/eps of a floating dtype: the condition number beyond which a factor's smallest
    singular direction is lost to rounding in that dtype (fp32 8.4e6, fp16 1024, bf16 128)."""
    return 1.0 / torch.finfo(getattr(torch, dtype)).eps


class Thinning:
    """Thins traces for display and remembers where it did.

    A trace of ``n > limit`` points is cut into ``limit // 2`` buckets of consecutive
    points; each bucket keeps its smallest and its largest finite value (a bucket of
    only non-finite values keeps its first point, drawn as a gap).

    Args:
        traces: How many traces the figure will hold; the per-trace limit is
            ``POINTS_PER_FIGURE / traces`` clipped to [60, 400].
    """

    def __init__(self, traces: int) -> None:
        per_trace = POINTS_PER_FIGURE // max(traces, 1)
        self.limit = max(MIN_POINTS_PER_TRACE, min(MAX_POINTS_PER_TRACE, per_trace))
        self.thinned = 0
        self.longest = 0

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(x)
        if n <= self.limit:
            return x, y
        self.thinned += 1
        self.longest = max(self.longest, n)
        edges = np.linspace(0, n, self.limit // 2 + 1).astype(int)
        keep: list[int] = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            seg = y[lo:hi]
            finite = np.flatnonzero(np.isfinite(seg))
            if finite.size == 0:
                keep.append(lo)
                continue
            pair = {lo + finite[np.argmin(seg[finite])], lo + finite[np.argmax(seg[finite])]}
            keep.extend(sorted(pair))
        return x[keep], y[keep]

    def notes(self) -> list[str]:
        """One sentence per figure where traces were thinned, else nothing."""
        if not self.thinned:
            return []
        return [
            f"Downsampled for display: {self.thinned} trace(s) longer than {self.limit} "
            f"points (up to {self.longest}) show each bucket's minimum and maximum, "
            f"{self.limit} points at most; records.parquet keeps every point."
        ]


def _xy(frame: pd.DataFrame, thin: Thinning) -> tuple[np.ndarray, np.ndarray]:
    frame = frame.sort_values("step")
    x = frame["step"].to_numpy(np.int32)
    y = frame["value"].to_numpy(np.float32)
    return thin(x, y)


def _records(data: ReportData, probe: str, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Records of ``probe`` with ``metric`` in ``metrics``, joined with the run's fields
    (``optimizer``, ``run_dtype``, ``scenario``, ``model``, ``seed``)."""
    rec = data.records
    rec = rec[(rec["probe"] == probe) & rec["metric"].isin(metrics)]
    # The selection is small: plain strings again, so that labels can be concatenated.
    rec = rec.astype({c: str for c in rec.select_dtypes("category").columns})
    runs = data.summary[["key", "optimizer", "dtype", "scenario", "model", "seed"]].rename(
        columns={"dtype": "run_dtype"}
    )
    return rec.merge(runs, on="key", how="inner")


def _multi(data: ReportData) -> bool:
    return len(data.sources) > 1


SOURCE_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def _color(data: ReportData, dtype: str, source: str) -> str | None:
    """One run directory: the dtype's colour. Several: one colour per (source, dtype), so
    that "before" and "after" of the same dtype stay apart."""
    if not _multi(data):
        return DTYPE_COLORS.get(dtype)
    pairs = sorted(set(zip(data.summary["source"], data.summary["dtype"], strict=True)))
    order = {src.label: i for i, src in enumerate(data.sources)}
    pairs.sort(key=lambda p: (order[p[0]], p[1]))
    return SOURCE_PALETTE[pairs.index((source, dtype)) % len(SOURCE_PALETTE)]


def _source_tag(data: ReportData, source: str) -> str:
    return f" [{source}]" if _multi(data) else ""


def _axes(index: int, ncols: int) -> dict[str, str]:
    """Axis ids of subplot ``index`` (0-based, row-major) in a make_subplots grid."""
    suffix = "" if index == 0 else str(index + 1)
    return {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}


def _spec(fig: go.Figure, traces: list[dict]) -> dict:
    """A figure as a plain spec: ``fig``'s layout and traces plus ``traces`` given as
    dicts, which skip Plotly's per-property validation (milliseconds per trace, which
    adds up to seconds for hundreds of runs)."""
    spec = fig.to_plotly_json()
    return {"data": [*spec["data"], *traces], "layout": spec["layout"]}


def _grid(n: int, cols: int = 2) -> tuple[int, int]:
    cols = min(cols, n)
    return math.ceil(n / cols), cols


class ViewSelector:
    """Traces of a per-step figure grouped into views, one per (model, scenario) (a
    frontier rung is a scenario, ``damping=1e-06``), of which the reader sees one at a
    time, picked from a dropdown menu (Plotly ``updatemenus``); traces added with
    `always` (a dtype's 1/eps level) show in every view.

    Views are listed in the order the summary first names them (the suite's order: a
    frontier's rungs mildest first); the first view with traces is shown on load.
    """

    def __init__(self, data: ReportData) -> None:
        pairs = zip(data.summary["model"], data.summary["scenario"], strict=True)
        self.order = list(dict.fromkeys(pairs))
        self.traces: dict[tuple[str, str], list[dict]] = {}
        self.fixed: list[dict] = []
        self._legends: dict[tuple[str, str], set[str]] = {}

    def add(self, view: tuple[str, str], legend: str, trace: dict) -> None:
        """Add a trace to ``view``; the first of each legend entry in a view shows it."""
        shown = self._legends.setdefault(view, set())
        trace["showlegend"] = legend not in shown
        shown.add(legend)
        self.traces.setdefault(view, []).append(trace)

    def always(self, trace: dict) -> None:
        """Add a trace shown in every view."""
        self.fixed.append(trace)

    def views(self) -> list[tuple[str, str]]:
        """The views with traces, in order."""
        return [view for view in self.order if view in self.traces]

    def figure(self, fig: go.Figure) -> dict:
        """``fig`` with every view's traces (the first view visible), the fixed ones, and
        a dropdown menu that shows one view at a time."""
        views = self.views()
        traces = []
        for index, view in enumerate(views):
            for trace in self.traces[view]:
                trace["visible"] = index == 0
                traces.append(trace)
        traces += self.fixed
        spec = _spec(fig, traces)
        if len(views) > 1:
            buttons = []
            for view in views:
                visible = [v == view for v in views for _ in self.traces[v]]
                visible += [True] * len(self.fixed)
                buttons.append(
                    {
                        "label": f"{view[0]} · {view[1]}",
                        "method": "restyle",
                        "args": [{"visible": visible}],
                    }
                )
            spec["layout"]["updatemenus"] = [
                {
                    "buttons": buttons,
                    "active": 0,
                    "direction": "down",
                    "showactive": True,
                    "x": 0,
                    "xanchor": "left",
                    "y": 1.0,
                    "yanchor": "bottom",
                    "pad": {"b": 30},
                }
            ]
            spec["layout"]["margin"] = {**LAYOUT["margin"], "t": 90}
        return spec


# --------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------


def stability_heatmap(data: ReportData) -> Section:
    """First non-finite step per optimizer x (scenario, dtype), earliest over models and
    seeds. Cells without NaN/Inf are orange where a run diverged through its loss alone
    (above 10x its first value, DESIGN.md) and green where every run held."""
    sec = Section(
        "stability",
        "Stability: first non-finite step",
        "Each cell is the earliest step at which a run of that optimizer, scenario and "
        "dtype met a NaN or Inf (darker red = earlier); orange: diverged without NaN/Inf "
        "(loss above 10x its start); green: every run held; blank: not in the suite.",
    )
    s = data.summary.copy()
    if s.empty:
        sec.empty = "No runs in the summary."
        return sec
    s["column"] = s["scenario"].astype(str) + " · " + s["dtype"].map(dtype_short)
    if _multi(data):
        s["column"] = s["source"] + " · " + s["column"]
    s["diverged_flag"] = s["diverged"].fillna(False).astype(bool)
    cells = (
        s.groupby(["optimizer", "column"], sort=True)
        .agg(
            first=("first_nonfinite_step", "min"),
            broke=("first_nonfinite_step", lambda v: int(v.notna().sum())),
            diverged=("diverged_flag", "sum"),
            runs=("run", "size"),
        )
        .reset_index()
    )
    rows = sorted(cells["optimizer"].unique())
    # The suite's order (a frontier's rungs mildest first), not the alphabet's.
    cols = list(dict.fromkeys(s["column"]))
    z_broke = np.full((len(rows), len(cols)), np.nan)
    z_status = np.full((len(rows), len(cols)), np.nan)  # 0 stable, 1 diverged (loss)
    text = np.full((len(rows), len(cols)), "", dtype=object)
    hover = np.full((len(rows), len(cols)), "", dtype=object)
    for c in cells.itertuples():
        i, j = rows.index(c.optimizer), cols.index(c.column)
        hover[i, j] = f"{c.broke} of {c.runs} run(s) met NaN/Inf, {c.diverged} diverged"
        if c.broke:
            z_broke[i, j] = c.first
            text[i, j] = f"step {int(c.first)}"
        elif c.diverged:
            z_status[i, j] = 1.0
            text[i, j] = "diverged"
        else:
            z_status[i, j] = 0.0
            text[i, j] = "stable"
    fig = go.Figure()
    common = {"x": cols, "y": rows, "text": text, "texttemplate": "%{text}", "xgap": 2}
    common |= {"ygap": 2, "customdata": hover}
    fig.add_heatmap(
        z=z_status,
        zmin=0,
        zmax=1,
        colorscale=[[0, "#d8f3dc"], [0.5, "#d8f3dc"], [0.5, "#ffd8a8"], [1, "#ffd8a8"]],
        showscale=False,
        hovertemplate="%{y} · %{x}: %{text}, %{customdata}<extra></extra>",
        **common,
    )
    fig.add_heatmap(
        z=z_broke,
        colorscale="Reds_r",
        colorbar={"title": "step"},
        hovertemplate="%{y} · %{x}: first NaN/Inf at %{text}, %{customdata}<extra></extra>",
        **common,
    )
    fig.update_layout(**LAYOUT, height=max(260, 90 + 34 * len(rows)))
    fig.update_xaxes(tickangle=-30)
    sec.figure = fig
    return sec


def event_counts(data: ReportData) -> Section:
    """Runs with a non-finite watched tensor at each step, per dtype."""
    sec = Section(
        "events",
        "Stability: non-finite events over steps",
        "Number of runs with any NaN or Inf in a watched tensor at each step, per dtype; "
        "a rising line means breakage spreads as training goes on.",
    )
    rec = _records(data, "numerics", ("nan_count", "posinf_count", "neginf_count"))
    rec = rec[rec["value"] > 0]
    if rec.empty:
        sec.empty = "No NaN or Inf was recorded in any watched tensor of any run."
        return sec
    per_step = (
        rec.groupby(["source", "run_dtype", "step"])["key"].nunique().rename("value").reset_index()
    )
    groups = list(per_step.groupby(["source", "run_dtype"]))
    thin = Thinning(len(groups))
    fig = go.Figure()
    for (source, dtype), g in groups:
        x, y = _xy(g, thin)
        fig.add_scatter(
            x=x,
            y=y,
            mode="lines+markers",
            name=dtype_short(dtype) + _source_tag(data, source),
            line={"color": _color(data, dtype, source)},
        )
    fig.update_layout(**LAYOUT, height=360, xaxis_title="step", yaxis_title="runs with NaN/Inf")
    sec.figure = fig
    sec.notes = thin.notes()
    return sec


# --------------------------------------------------------------------------------------
# Condition numbers and precision error
# --------------------------------------------------------------------------------------


def condition_numbers(data: ReportData) -> Section:
    """Per optimizer, the condition number of each factor over steps: the largest over
    the model's layers and the seeds, one line per (dtype, factor), for the model and
    scenario (or frontier rung) the reader picks (`ViewSelector`)."""
    sec = Section(
        "condition",
        "Condition numbers of the preconditioner factors",
        "Largest condition number over layers at each step (log scale), one panel per "
        "optimizer, for the model and scenario or frontier rung picked in the menu; a line "
        "above its dtype's dotted 1/eps level has lost its smallest directions to rounding.",
    )
    rec = _records(data, "condition", ("condition_number",))
    rec = rec[rec["tensor"].isin(FACTOR_DASH)]
    if rec.empty:
        sec.empty = (
            "No condition numbers were recorded (no SINGD or KFAC run, or the probe was off)."
        )
        return sec
    keys = ["source", "model", "scenario", "run_dtype", "tensor"]
    worst = rec.groupby(["optimizer", *keys, "step"])["value"].max().reset_index()
    optimizers = sorted(worst["optimizer"].unique())
    nrows, ncols = _grid(len(optimizers))
    fig = make_subplots(
        nrows, ncols, subplot_titles=optimizers, shared_xaxes=False, vertical_spacing=0.08
    )
    groups = list(worst.groupby(["optimizer", *keys]))
    thin = Thinning(len(groups))
    views = ViewSelector(data)
    for (opt, source, model, scenario, dtype, tensor), g in groups:
        i = optimizers.index(opt)
        x, y = _xy(g, thin)
        legend = f"{dtype_short(dtype)} {tensor}{_source_tag(data, source)}"
        views.add(
            (model, scenario),
            legend,
            {
                "type": "scatter",
                "x": x,
                "y": y,
                "mode": "lines",
                "name": legend,
                "legendgroup": legend,
                "line": {"color": _color(data, dtype, source), "dash": FACTOR_DASH[tensor]},
                "hovertemplate": f"{model} · {scenario} · {legend}"
                "<br>step %{x}: %{y:.3g}<extra></extra>",
                **_axes(i, ncols),
            },
        )
    # Drawn as traces, not shapes: shapes on a log axis take log10 coordinates. Shown in
    # every view: the levels are the dtype's, whichever run is picked.
    span = [int(worst["step"].min()), int(worst["step"].max())]
    for dtype in sorted(worst["run_dtype"].unique()):
        level = inverse_eps(dtype)
        label = f"1/eps {dtype_short(dtype)}"
        color = DTYPE_COLORS.get(dtype, "#555")
        for i in range(len(optimizers)):
            views.always(
                {
                    "type": "scatter",
                    "x": span,
                    "y": [level, level],
                    "mode": "lines+text",
                    "text": [label, ""],
                    "textposition": "top right",
                    "textfont": {"size": 10, "color": color},
                    "name": label,
                    "legendgroup": label,
                    "showlegend": i == 0,
                    "line": {"dash": "dot", "color": color, "width": 1},
                    "hovertemplate": f"{label} = {level:.3g}<extra></extra>",
                    **_axes(i, ncols),
                }
            )
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_xaxes(title_text="step")
    fig.update_layout(**LAYOUT, height=160 + 300 * nrows)
    sec.figure = views.figure(fig)
    sec.notes = thin.notes()
    return sec


def _box_stats(values: pd.Series) -> dict[str, float]:
    v = values.to_numpy(np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"q1": q1, "median": med, "q3": q3, "lowerfence": v.min(), "upperfence": v.max()}


def _boxes(
    data: ReportData, rec: pd.DataFrame, by: str, name_of: Callable[[str, str], str]
) -> go.Figure:
    """Boxes from quartiles (not raw points, to stay small): per ``by`` x run dtype."""
    fig = go.Figure()
    for (source, dtype), g in rec.groupby(["source", "run_dtype"]):
        cats, stats = [], []
        for cat, h in g.groupby(by):
            st = _box_stats(h["value"])
            if st:
                cats.append(cat)
                stats.append(st)
        if not cats:
            continue
        fig.add_box(
            x=cats,
            name=name_of(dtype, source),
            marker_color=_color(data, dtype, source),
            **{k: [s[k] for s in stats] for k in stats[0]},
        )
    fig.update_layout(**LAYOUT, boxmode="group", height=420)
    return fig


def precision_error(data: ReportData) -> Section:
    """Relative error of the preconditioned gradient computed in the run's dtype against
    the same computation in float64, per optimizer and dtype."""
    sec = Section(
        "precision-error",
        "Differential precision error of the preconditioned gradient",
        "||P(g) in dtype - P(g) in float64|| / ||P(g) in float64|| over all layers and "
        "steps (box: quartiles, whiskers: min and max, log scale); lower is better.",
    )
    rec = _records(data, "condition", ("precond_rel_error",))
    if rec.empty:
        sec.empty = (
            "No preconditioner error was recorded (no SINGD or KFAC run, or the probe was off)."
        )
        return sec
    fig = _boxes(data, rec, "optimizer", lambda d, s: dtype_short(d) + _source_tag(data, s))
    fig.update_yaxes(type="log", exponentformat="power", title_text="relative error")
    sec.figure = fig
    return sec


def range_fractions(data: ReportData) -> Section:
    """Largest underflow and overflow-risk fractions per watched tensor and dtype."""
    sec = Section(
        "range",
        "Underflow and overflow risk",
        "Largest fraction of a watched tensor's nonzero values that underflow (left) or sit "
        "near the dtype's maximum (right), over layers, steps and runs (log scale; no bar "
        "means zero).",
    )
    rec = _records(data, "numerics", ("underflow_fraction", "overflow_risk_fraction"))
    if rec.empty:
        sec.empty = "No underflow or overflow-risk fractions were recorded."
        return sec
    fig = make_subplots(1, 2, subplot_titles=["underflow fraction", "overflow-risk fraction"])
    shown: set[str] = set()
    for col, metric in enumerate(("underflow_fraction", "overflow_risk_fraction"), start=1):
        part = rec[rec["metric"] == metric]
        for (source, dtype), g in part.groupby(["source", "run_dtype"]):
            top = g.groupby("tensor")["value"].max()
            _paired_bar(fig, data, source, dtype, list(top.index), top, shown, col)
        if not (part["value"] > 0).any():
            fig.add_annotation(
                text="all zero in every run",
                showarrow=False,
                xref=f"x{col if col > 1 else ''} domain",
                yref=f"y{col if col > 1 else ''} domain",
                x=0.5,
                y=0.5,
            )
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_layout(**LAYOUT, barmode="group", height=420)
    sec.figure = fig
    return sec


# --------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------


OPTIMIZER_DASH = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
"""Line styles that tell optimizers apart where colour tells the dtypes apart."""


def training_curves(data: ReportData) -> Section:
    """Loss (log scale) and, where recorded, test accuracy over steps, one line per run,
    for the model and scenario (or frontier rung) the reader picks (`ViewSelector`)."""
    sec = Section(
        "training",
        "Loss and test accuracy",
        "Training loss per run (left, log scale) and test accuracy on the digits (right) for "
        "the model and scenario or frontier rung picked in the menu; colour is the dtype (and "
        "run directory, when comparing), the line style the optimizer, hover shows the run; "
        "a line that stops has diverged.",
    )
    rec = _records(data, "train", ("loss", "test_accuracy"))
    if rec.empty:
        sec.empty = "No training loss was recorded."
        return sec
    has_acc = (rec["metric"] == "test_accuracy").any()
    fig = make_subplots(
        1, 2 if has_acc else 1, subplot_titles=["loss", "test accuracy"][: 2 if has_acc else 1]
    )
    groups = list(rec.groupby(["metric", "key"]))
    thin = Thinning(len(groups))
    runs = data.summary.set_index("key")
    optimizers = sorted(data.summary["optimizer"].unique())
    views = ViewSelector(data)
    for (metric, key), g in groups:
        run = runs.loc[key]
        x, y = _xy(g, thin)
        legend = f"{run['optimizer']} {dtype_short(run['dtype'])}"
        legend += _source_tag(data, run["source"])
        dash = OPTIMIZER_DASH[optimizers.index(run["optimizer"]) % len(OPTIMIZER_DASH)]
        views.add(
            (run["model"], run["scenario"]),
            legend,
            {
                "type": "scatter",
                "x": x,
                "y": y,
                "mode": "lines" if metric == "loss" else "lines+markers",
                "name": legend,
                "legendgroup": legend,
                "line": {
                    "color": _color(data, run["dtype"], run["source"]),
                    "width": 1.5,
                    "dash": dash,
                },
                "opacity": 0.8,
                "hovertemplate": f"{key}<br>{run['optimizer']} · {run['model']} · "
                f"{run['scenario']}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
                **_axes(0 if metric == "loss" else 1, 2),
            },
        )
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(**LAYOUT, height=460)
    sec.figure = views.figure(fig)
    sec.notes = thin.notes()
    return sec


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def _last_step(rec: pd.DataFrame) -> pd.DataFrame:
    last = rec.groupby("key")["step"].transform("max")
    return rec[rec["step"] == last]


def memory_by_factor(data: ReportData) -> Section:
    """Optimizer-state bytes per factor or category, stacked per optimizer, with AdamW's
    state for the same model beside them; at the last recorded step, mean over runs."""
    sec = Section(
        "memory",
        "Optimizer-state memory by factor",
        "Each bar stacks an optimizer's state by factor (summed over layers) and other "
        "category in MB at the last step; the grey 'AdamW (ref)' bar is what AdamW would "
        "hold for the same model.",
    )
    rec = _records(data, "memory", ("bytes", "adamw_state_bytes"))
    if rec.empty:
        sec.empty = "No optimizer-state memory was recorded."
        return sec
    rec = _last_step(rec)
    # Per-layer factor rows summed over layers; the other categories as the optimizer
    # reports them (its factor categories would count the factors twice).
    factors = rec[(rec["module"] != "") & rec["tensor"].isin(set(FACTOR_DASH) | set(FACTORS))]
    others = rec[(rec["module"] == "") & (rec["value"] > 0)]
    others = others[(others["metric"] != "bytes") | ~others["tensor"].isin(NOT_STACKED)]
    rec = pd.concat([factors, others])
    per_run = (
        rec.groupby(["key", "source", "model", "run_dtype", "optimizer", "metric", "tensor"])[
            "value"
        ]
        .sum()
        .reset_index()
    )
    mean = (
        per_run.groupby(["source", "model", "run_dtype", "optimizer", "metric", "tensor"])["value"]
        .mean()
        .reset_index()
    )
    mean["group"] = mean["model"] + " " + mean["run_dtype"].map(dtype_short)
    if _multi(data):
        mean["group"] = mean["source"] + " · " + mean["group"]
    state = mean[mean["metric"] == "bytes"]
    adamw = mean[mean["metric"] == "adamw_state_bytes"]
    fig = go.Figure()
    for tensor, g in state.groupby("tensor"):
        fig.add_bar(
            x=[g["group"].tolist(), g["optimizer"].tolist()],
            y=(g["value"] / 1e6).to_numpy(np.float32),
            name=tensor,
            marker_color=SEGMENT_COLORS.get(tensor),
            hovertemplate=f"{tensor}: %{{y:.4g}} MB<extra></extra>",
        )
    if not adamw.empty:
        beside = adamw.groupby("group")["value"].max()
        fig.add_bar(
            x=[list(beside.index), ["AdamW (ref)"] * len(beside)],
            y=(beside / 1e6).to_numpy(np.float32),
            name="AdamW state",
            marker_color="#8c959f",
            hovertemplate="AdamW: %{y:.4g} MB<extra></extra>",
        )
    fig.update_layout(**LAYOUT, barmode="stack", height=460, yaxis_title="MB (1e6 B)")
    sec.figure = fig
    return sec


def _paired_bar(fig, data: ReportData, source, dtype, x, y: pd.Series, shown: set, col: int):
    """One dtype's bars in subplot ``col`` of a two-panel figure; its legend entry once."""
    name = dtype_short(dtype) + _source_tag(data, source)
    fig.add_bar(
        x=x,
        y=y.to_numpy(np.float32),
        name=name,
        legendgroup=name,
        showlegend=name not in shown,
        marker_color=_color(data, dtype, source),
        row=1,
        col=col,
    )
    shown.add(name)


def peak_memory(data: ReportData) -> Section:
    """Measured peak memory per model, optimizer and dtype (largest over runs): the peak of
    live tensors above the model's own (comparable on the CPU too), and the device's or the
    process's peak beside it."""
    sec = Section(
        "peak-memory",
        "Measured peak memory",
        "Left: peak of live tensor bytes above the model's own parameters, buffers and data "
        "(optimizer state, gradients, activations, temporaries) over the optimizer's "
        f"construction and first {MEMORY_STEPS} steps, the figure to compare optimizers and "
        "dtypes by. "
        "Right: the CUDA allocator's peak, or on the CPU the process's resident high-water "
        "mark, which the torch runtime's own footprint dominates there. Largest over the "
        "runs of each model, optimizer and dtype, MB.",
    )
    s = data.summary
    columns = [c for c in ("peak_tensor_bytes", "peak_memory_bytes") if c in s]
    if not columns or s[columns].isna().all().all():
        sec.empty = "No run recorded its peak memory."
        return sec
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "peak tensor memory above the model's own",
            "peak memory (device or process)",
        ),
    )
    shown: set[str] = set()
    for col, column in enumerate(("peak_tensor_bytes", "peak_memory_bytes"), start=1):
        if column not in s:
            continue
        for (source, dtype), g in s.dropna(subset=[column]).groupby(["source", "dtype"]):
            m = g.groupby(["model", "optimizer"])[column].max()
            x = [list(m.index.get_level_values(0)), list(m.index.get_level_values(1))]
            _paired_bar(fig, data, source, dtype, x, m / 1e6, shown, col)
    fig.update_layout(**LAYOUT, barmode="group", height=460)
    # Models differ by orders of magnitude: a log scale keeps the small ones readable.
    fig.update_yaxes(title_text="MB (1e6 B), log scale", type="log", row=1, col=1)
    fig.update_yaxes(title_text="MB (1e6 B)", row=1, col=2)
    sec.figure = fig
    return sec


FIGURE_BUILDERS: tuple[Callable[[ReportData], Section], ...] = (
    stability_heatmap,
    event_counts,
    condition_numbers,
    precision_error,
    range_fractions,
    training_curves,
    memory_by_factor,
    peak_memory,
)
"""The figure sections of the page, in reading order."""
