"""The report's opening: one frontier figure per knob, and one sentence per knob saying
what the suite found.

A frontier (DESIGN.md) sweeps a knob along a ladder, mildest rung first; every rung is a
run in the low-precision dtype beside its float32 control. The entries are recomputed from
each run directory's runs by `precision_lab.run.frontiers.frontier_entries` (the function
that wrote summary.json's ``frontiers``), so the page and the summary cannot disagree.

The figure: the ladder on the x axis (one column per rung, labelled with its value), one
row per optimizer in the dtype and, under it, the row of its float32 control; each rung
is a marker whose colour *and* symbol say what the run did (held, broke, did not learn,
missing), so that it reads in greyscale too. A black bar before a rung marks the breaking
point (the mildest rung that broke); the cost in rungs is written at the end of the dtype's
row. With several seeds, each seed is its own marker within the row, and the bar stands at
the median breaking point.

The sentence is written from the same `FrontierRow` objects the figure draws.
"""

from __future__ import annotations

import html
import re
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from plotly.subplots import make_subplots

from precision_lab.report.figures import LAYOUT, dtype_short
from precision_lab.report.page import Section
from precision_lab.run.frontiers import frontier_entries, median_cost

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

STATUS_STYLE = {
    "held": ("held", "#009E73", "circle"),
    "broke": ("broke", "#D55E00", "x"),
    "no_learning": ("did not learn", "#56B4E9", "diamond"),
    "missing": ("missing", "#999999", "circle-open"),
}
"""Each rung status's legend label, colour (Okabe-Ito, safe for colour-blind readers) and
marker symbol (distinct without colour)."""

ROW_PX = 34
"""Height of a row of markers (pixels)."""
GAP_PX = 110
"""Room between two panels for the upper one's rung labels and the lower one's title."""


def rung(value: float) -> str:
    """A knob value as run ids write it (``format(value, "g")``)."""
    return format(value, "g")


def _runs(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """A source's summary rows back as run objects (null for missing values)."""
    frame = summary.astype(object).where(summary.notna(), None)
    return frame.to_dict("records")


@dataclass
class Side:
    """One side of a frontier row, the dtype's runs or their float32 controls, per seed.

    Attributes:
        statuses: per seed, per rung: ``held``, ``broke``, ``no_learning`` or ``missing``.
        breaking_points: per seed, the mildest rung that broke (None: held everywhere).
        monotone: per seed, False where it held again at a harsher rung after breaking.
    """

    statuses: list[list[str]]
    breaking_points: list[float | None]
    monotone: list[bool]

    def positions(self, ladder: tuple[float, ...]) -> list[int]:
        """Per seed, the breaking point's index on the ladder (its length: held)."""
        return [len(ladder) if bp is None else ladder.index(bp) for bp in self.breaking_points]

    def rungs_with(self, status: str, ladder: tuple[float, ...]) -> list[str]:
        """The rungs where any seed had ``status``."""
        return [
            rung(value)
            for i, value in enumerate(ladder)
            if any(seed[i] == status for seed in self.statuses)
        ]


@dataclass
class FrontierRow:
    """One optimizer in one dtype and mode on one (source, model, knob)'s ladder.

    Attributes:
        costs: per seed, the precision cost in rungs (None: a rung it needs is missing).
        lower_bound: per seed, whether the cost is a lower bound (float32 held everywhere,
            or the run broke at the mildest rung already).
        median_cost: over the seeds (`precision_lab.run.frontiers.median_cost`); None
            where any seed's is unknown.
    """

    source: str
    model: str
    knob: str
    optimizer: str
    dtype: str
    mode: str
    ladder: tuple[float, ...]
    seeds: list[int]
    run: Side
    control: Side
    costs: list[int | None]
    lower_bound: list[bool]
    median_cost: float | None = None

    @property
    def label(self) -> str:
        mode = "" if self.mode == "pure" else f" {self.mode}"
        return f"{self.optimizer} · {dtype_short(self.dtype)}{mode}"

    @property
    def known(self) -> bool:
        """Every seed's cost is known (no rung it needs is missing)."""
        return all(cost is not None for cost in self.costs)

    def median(self, side: Side) -> int:
        """The median breaking position over seeds (the milder middle one when even)."""
        return statistics.median_low(side.positions(self.ladder))


def frontier_rows(data: ReportData) -> list[FrontierRow]:
    """Every frontier of every source, one row per (source, model, knob, optimizer, dtype,
    mode) with its seeds, in the order of the entries."""
    rows: dict[tuple, FrontierRow] = {}
    for source in data.sources:
        entries = frontier_entries(_runs(source.summary))
        medians = median_cost(entries)
        for entry in entries:
            ladder = tuple(entry["ladder"])
            key = (source.label, entry["model"], entry["knob"], entry["optimizer"])
            key += (entry["dtype"], entry["mode"], ladder)
            if key not in rows:
                empty = {"statuses": [], "breaking_points": [], "monotone": []}
                rows[key] = FrontierRow(
                    *key,
                    seeds=[],
                    run=Side(**empty),
                    control=Side(**{k: [] for k in empty}),
                    costs=[],
                    lower_bound=[],
                )
            row = rows[key]
            row.seeds.append(entry["seed"])
            for side, prefix in ((row.run, ""), (row.control, "control_")):
                side.statuses.append([r[f"{prefix}status"] for r in entry["rungs"]])
                side.breaking_points.append(entry[f"{prefix}breaking_point"])
                side.monotone.append(bool(entry.get(f"{prefix}monotone", True)))
            row.costs.append(entry["precision_cost"])
            row.lower_bound.append(bool(entry.get("cost_lower_bound")))
            row.median_cost = medians[key[1:6]]
    return list(rows.values())


# --------------------------------------------------------------------------------------
# The sentence
# --------------------------------------------------------------------------------------


def _rungs_phrase(count: float) -> str:
    count = int(count) if float(count).is_integer() else count
    return f"{count} rung{'' if count == 1 else 's'}"


def _name(row: FrontierRow) -> str:
    return row.optimizer if row.mode == "pure" else f"{row.optimizer} ({row.mode})"


def finding(row: FrontierRow) -> str:
    """What one row found, as a clause: its breaking point against float32's, the cost in
    rungs, and what qualifies it (unknown rungs, a lower bound, a non-monotone ladder,
    rungs where a run did not learn, the seeds)."""
    ladder, n = row.ladder, len(row.ladder)
    opt = _name(row)
    if not row.known:
        missing = row.run.rungs_with("missing", ladder) + row.control.rungs_with("missing", ladder)
        shown = ", ".join(dict.fromkeys(missing)) or "some rungs"
        return f"{opt}'s breaking point is unknown ({shown} did not run)"
    p, c = row.median(row.run), row.median(row.control)
    several = len(row.seeds) > 1
    at = "a median of " if several else ""
    where = rung(ladder[p]) if p < n else None
    control_at = rung(ladder[c]) if c < n else None
    cost = row.median_cost
    notes: list[str] = []
    if p == n and c == n:
        text = f"{opt} holds on every rung, as float32 does"
        notes.append("cost 0")
    elif p == 0 and c == 0:
        text = (
            f"{opt} breaks already at the mildest rung ({where}) in float32 too: this ladder "
            "says nothing about the dtype"
        )
    elif p == c:
        text = f"{opt} breaks at {at}{where}, as float32 does"
        notes.append("cost 0")
    elif p < c:
        if c == n:
            text = f"{opt} breaks at {at}{where} where float32 holds on every rung"
        else:
            text = f"{opt} breaks at {at}{where} where float32 breaks at {at}{control_at}"
        bound = "at least " if any(row.lower_bound) else ""
        notes.append(f"cost {bound}{_rungs_phrase(cost)}")
    elif p == n:
        text = f"{opt} holds on every rung where float32 breaks at {at}{control_at}"
    else:
        text = f"{opt} breaks at {at}{where}, later than float32 at {at}{control_at}"
    if p > c:
        # The medians' distance: over seeds the median cost may disagree in sign.
        notes.append(f"float32 broke first, {_rungs_phrase(p - c)} earlier")
    if several:
        per_seed = ", ".join("held" if bp is None else rung(bp) for bp in row.run.breaking_points)
        notes.append(f"over {len(row.seeds)} seeds, breaking at {per_seed}")
    if not all(row.run.monotone):
        notes.append("not monotone: it held again at a harsher rung after breaking")
    if not all(row.control.monotone):
        notes.append("float32 not monotone: it held again at a harsher rung after breaking")
    for side, whose in ((row.run, ""), (row.control, "float32 ")):
        quiet = side.rungs_with("no_learning", ladder)
        if side is row.control and where in quiet:
            # The failure_cause rule: a control that did not learn says nothing of the dtype.
            quiet.remove(where)
            others = f", nor at {', '.join(quiet)}" if quiet else ""
            notes.append(
                f"float32 did not learn at {where}, so that rung says nothing of the dtype{others}"
            )
        elif quiet:
            notes.append(f"{whose}did not learn at {', '.join(quiet)}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _grouped(rows: list[FrontierRow]) -> list[str]:
    """The rows' findings, optimizers that found the same said together ("a, b and c hold
    on every rung, as float32 does (cost 0)"), in the order of their first row."""
    said: dict[str, list[str]] = {}
    for row in rows:
        name = _name(row)
        predicate = finding(row)[len(name) :]
        # "x's breaking point is unknown" stays alone: its subject is possessive.
        key = predicate if predicate.startswith(" ") else name + predicate
        said.setdefault(key, []).append(name)
    clauses = []
    for predicate, names in said.items():
        if not predicate.startswith(" "):
            clauses.append(predicate)
            continue
        if len(names) > 1:
            for verb in ("holds", "breaks"):
                if predicate.startswith(f" {verb} "):
                    predicate = f" {verb[:-1]}{predicate[len(verb) + 1 :]}"
        subject = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        clauses.append(subject + predicate)
    return clauses


def knob_sentence(knob: str, rows: list[FrontierRow], source: str | None) -> str:
    """One sentence for one knob (of one source, when comparing), from its rows."""
    first = rows[0].ladder
    ladder = f"{rung(first[0])} .. {rung(first[-1])}" if len(first) > 1 else rung(first[0])
    lead = f"In {source}, on" if source else "On"
    clauses = []
    groups: dict[tuple, list[FrontierRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.dtype, row.mode, row.ladder), []).append(row)
    for (model, dtype, mode, own), members in groups.items():
        other = "" if own == first else f" (ladder {rung(own[0])} .. {rung(own[-1])})"
        mode_text = "" if mode == "pure" else f" ({mode})"
        body = "; ".join(_grouped(members))
        clauses.append(f"on the {model}{other} in {dtype}{mode_text}, {body}")
    return f"{lead} the {knob} ladder ({ladder}, {len(first)} rungs): {'; '.join(clauses)}."


# --------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------


def _panel_traces(
    rows: list[FrontierRow], axis: str, shown: set[str]
) -> tuple[list[dict], list[float], list[str]]:
    """The markers, breaking-point bars and cost labels of one subplot; its y ticks."""
    traces: list[dict] = []
    points: dict[str, dict[str, list]] = {s: {"x": [], "y": [], "text": []} for s in STATUS_STYLE}
    bars: dict[str, list] = {"x": [], "y": [], "text": []}
    costs: dict[str, list] = {"x": [], "y": [], "text": []}
    tickvals: list[float] = []
    ticktext: list[str] = []
    y = 0.0
    for row in rows:
        n = len(row.ladder)
        for side, label in ((row.run, row.label), (row.control, f"{row.optimizer} · fp32 control")):
            y -= 1
            tickvals.append(y)
            ticktext.append(label)
            seeds = len(row.seeds)
            for k, (seed, statuses) in enumerate(zip(row.seeds, side.statuses, strict=True)):
                dy = 0.0 if seeds == 1 else (k - (seeds - 1) / 2) * 0.7 / seeds
                for i, status in enumerate(statuses):
                    pts = points[status]
                    pts["x"].append(i)
                    pts["y"].append(y + dy)
                    pts["text"].append(
                        f"{label}<br>{row.knob} = {rung(row.ladder[i])}, seed {seed}: "
                        f"{STATUS_STYLE[status][0]}"
                    )
            position = row.median(side)
            if position < n:
                bars["x"] += [position - 0.5, position - 0.5, None]
                bars["y"] += [y - 0.42, y + 0.42, None]
                what = "median breaking point" if seeds > 1 else "breaking point"
                bars["text"] += [f"{label}: {what} {rung(row.ladder[position])}"] * 2 + [None]
            if side is row.run:
                costs["x"].append(n - 0.35)
                costs["y"].append(y)
                cost = row.median_cost
                if cost is None:
                    costs["text"].append("cost unknown")
                else:
                    bound = "≥ " if any(row.lower_bound) and cost > 0 else ""
                    costs["text"].append(f"cost {bound}{cost:g}")
    for status, pts in points.items():
        if not pts["x"]:
            continue
        name, color, symbol = STATUS_STYLE[status]
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": pts["x"],
                "y": pts["y"],
                "name": name,
                "legendgroup": status,
                "showlegend": status not in shown,
                "marker": {
                    "color": color,
                    "symbol": symbol,
                    "size": 13,
                    "line": {"width": 2, "color": color},
                },
                "hovertext": pts["text"],
                "hoverinfo": "text",
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
            }
        )
        shown.add(status)
    if bars["x"]:
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "x": bars["x"],
                "y": bars["y"],
                "name": "breaking point",
                "legendgroup": "breaking point",
                "showlegend": "bar" not in shown,
                "line": {"color": "#000000", "width": 4},
                "hovertext": bars["text"],
                "hoverinfo": "text",
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
            }
        )
        shown.add("bar")
    traces.append(
        {
            "type": "scatter",
            "mode": "text",
            "x": costs["x"],
            "y": costs["y"],
            "text": costs["text"],
            "textposition": "middle right",
            "showlegend": False,
            "hoverinfo": "skip",
            "xaxis": f"x{axis}",
            "yaxis": f"y{axis}",
        }
    )
    return traces, tickvals, ticktext


def knob_figure(rows: list[FrontierRow], several_sources: bool) -> dict:
    """The frontier figure of one knob: one subplot per (source, model, dtype, mode, ladder)."""
    panels: dict[tuple, list[FrontierRow]] = {}
    for row in rows:
        panels.setdefault((row.source, row.model, row.dtype, row.mode, row.ladder), []).append(row)
    titles = [
        (f"{source} · " if several_sources else "")
        + f"{model} · {dtype_short(dtype)}{'' if mode == 'pure' else ' ' + mode}"
        for source, model, dtype, mode, _ in panels
    ]
    heights = [2 * len(members) for members in panels.values()]
    height = 160 + sum(ROW_PX * h + GAP_PX for h in heights)
    fig = make_subplots(
        len(panels),
        1,
        subplot_titles=titles,
        row_heights=heights,
        vertical_spacing=GAP_PX / (height - 90) if len(panels) > 1 else 0,
    )
    spec = fig.to_plotly_json()
    layout = spec["layout"]
    traces: list[dict] = []
    shown: set[str] = set()
    bands: list[dict] = []
    labels: list[str] = []
    for index, ((_, _, _, _, ladder), members) in enumerate(panels.items()):
        axis = "" if index == 0 else str(index + 1)
        made, tickvals, ticktext = _panel_traces(members, axis, shown)
        traces += made
        labels += ticktext
        # Every other optimizer's pair of rows (dtype, control) on a light band.
        bands += [
            {
                "type": "rect",
                "layer": "below",
                "xref": f"x{axis}",
                "yref": f"y{axis}",
                "x0": -0.6,
                "x1": len(ladder) + 0.9,
                "y0": tickvals[k + 1] - 0.5,
                "y1": tickvals[k] + 0.5,
                "fillcolor": "#f3f4f6",
                "line": {"width": 0},
            }
            for k in range(2, len(tickvals), 4)
        ]
        layout[f"xaxis{axis}"] |= {
            "tickvals": list(range(len(ladder))),
            "ticktext": [rung(v) for v in ladder],
            "range": [-0.6, len(ladder) + 0.9],
            "title": {"text": f"{members[0].knob} (mildest left)"},
            "showgrid": False,
            "zeroline": False,
        }
        layout[f"yaxis{axis}"] |= {
            "tickvals": tickvals,
            "ticktext": ticktext,
            "range": [min(tickvals) - 0.6, -0.4],
            "showgrid": False,
            "zeroline": False,
        }
    layout |= LAYOUT
    # The legend on a line of its own at the top, above the first panel's title.
    # Room on the left for the longest row label (about 7 px a character at 12 px).
    left = 30 + 7 * max(map(len, labels))
    layout["margin"] = {**LAYOUT["margin"], "l": left, "t": 80}
    layout["shapes"] = bands
    layout["height"] = height
    layout["legend"] = {
        "orientation": "h",
        "yref": "container",
        "y": 1,
        "yanchor": "top",
        "x": 0,
    }
    return {"data": traces, "layout": layout}


def _key(knob: str) -> str:
    return "frontier-" + re.sub(r"[^A-Za-z0-9-]+", "-", knob).strip("-")


CAPTION = (
    "The ladder runs left to right from its mildest rung; each optimizer has a row in the "
    "dtype and, under it, its float32 control's row. Markers: green circle held, vermillion "
    "cross broke, blue diamond did not learn (did not break), grey ring missing; a black "
    "bar marks the breaking point (the mildest rung that broke); the cost in rungs closes "
    "the dtype's row. Seeds are drawn side by side within a row."
)


def frontier_sections(data: ReportData) -> list[Section]:
    """One section per knob: its sentence and its figure; a single section saying so
    when no run directory holds a frontier."""
    rows = frontier_rows(data)
    if not rows:
        return [
            Section(
                "frontiers",
                "Frontiers",
                "Breaking points along a knob's ladder, in the dtype and in float32.",
                empty="These runs hold no frontier (no rung of a knob's ladder), so the "
                "report cannot say where the dtype breaks earlier than float32; suites "
                "declare frontiers as docs/suites.md shows.",
            )
        ]
    several = len(data.sources) > 1
    knobs: dict[str, list[FrontierRow]] = {}
    for row in rows:
        knobs.setdefault(row.knob, []).append(row)
    sections = []
    for knob, members in knobs.items():
        by_source: dict[str, list[FrontierRow]] = {}
        for row in members:
            by_source.setdefault(row.source, []).append(row)
        sentences = [
            knob_sentence(knob, group, source if several else None)
            for source, group in by_source.items()
        ]
        found = "".join(f'<p class="finding"><b>Found:</b> {html.escape(s)}</p>' for s in sentences)
        sections.append(
            Section(
                _key(knob),
                f"Frontier: {knob}",
                CAPTION,
                figure=knob_figure(members, several),
                html=found,
            )
        )
    return sections
