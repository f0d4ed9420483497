"""The report's tables: the overview of every run and the environment of each source.

Plain HTML tables (not Plotly), so they stay readable and searchable in any browser; the
overview sorts on a click of its header (`precision_lab.report.page`'s script) and
highlights the runs that broke.
"""

from __future__ import annotations

import html
import json
import math
from typing import TYPE_CHECKING

import pandas as pd

from precision_lab.report.page import Section, data_table
from precision_lab.run.summary import SUMMARY_FIELDS, broke

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

OVERVIEW_HEADERS: dict[str, tuple[str, float]] = {
    "run": ("run", 1.0),
    "model": ("model", 1.0),
    "scenario": ("scenario", 1.0),
    "optimizer": ("optimizer", 1.0),
    "dtype": ("dtype", 1.0),
    "mode": ("mode", 1.0),
    "seed": ("seed", 1.0),
    "steps": ("steps", 1.0),
    "finished": ("finished", 1.0),
    "diverged": ("diverged", 1.0),
    "first_nonfinite_step": ("first NaN/Inf step", 1.0),
    "nan_events": ("NaN steps", 1.0),
    "inf_events": ("Inf steps", 1.0),
    "skipped_steps": ("skipped steps", 1.0),
    "overflow_events": ("overflow events", 1.0),
    "underflow_fraction": ("underflow fraction", 1.0),
    "max_condition": ("max condition", 1.0),
    "optimizer_state_bytes": ("optimizer state (MB)", 1e-6),
    "peak_memory_bytes": ("peak memory (MB)", 1e-6),
    "peak_tensor_bytes": ("peak tensor memory (MB)", 1e-6),
    "final_loss": ("final loss", 1.0),
    "accuracy": ("test accuracy", 1.0),
    "learned": ("learned", 1.0),
    "step_time_ms": ("step time (ms)", 1.0),
    "failure_cause": ("failure cause", 1.0),
    "preconditioned_fraction": ("preconditioned fraction", 1.0),
    "precision_events": ("precision events", 1.0),
    "promoted_fraction": ("promoted fraction", 1.0),
    "promoted_bytes": ("promoted extra (kB)", 1e-3),
}
"""The summary fields the overview shows (in `SUMMARY_FIELDS`' order), each with its
header (unit included) and the scale applied for display."""


def is_broken(run: pd.Series) -> bool:
    """Whether a summary row broke (`precision_lab.run.summary.broke`; NaN read as null)."""
    return bool(broke({k: None if _missing(v) else v for k, v in run.items()}))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: object, scale: float) -> str:
    if _missing(value):
        return '<td class="num" data-v="">–</td>'
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value) * scale
        shown = f"{v:.4g}" if not float(value).is_integer() or scale != 1.0 else f"{int(v)}"
        return f'<td class="num" data-v="{v!r}">{shown}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def overview_table(data: ReportData) -> Section:
    """Every run of every source, one row each, sortable, broken runs highlighted."""
    s = data.summary
    broken = s.apply(is_broken, axis=1)
    sec = Section(
        "overview",
        "Overview of every run",
        f"{len(s)} runs, {int(broken.sum())} broke (highlighted in red); click a column "
        "header to sort by it.",
    )
    columns = [
        (name, *OVERVIEW_HEADERS[name])
        for name in SUMMARY_FIELDS
        if name in OVERVIEW_HEADERS and name in s.columns
    ]
    if len(data.sources) > 1:
        columns = [("source", "source", 1.0), *columns]
    rows = []
    for (_, run), bad in zip(s.iterrows(), broken, strict=True):
        cells = "".join(_cell(run.get(field), scale) for field, _, scale in columns)
        rows.append(f'<tr class="broken">{cells}</tr>' if bad else f"<tr>{cells}</tr>")
    sec.html = data_table("overview-table", [header for _, header, _ in columns], rows)
    return sec


def sources_table(data: ReportData) -> Section:
    """On a comparison page, one row per run directory: how many runs broke, how well they
    learned, what they cost."""
    sec = Section(
        "side-by-side",
        "Run directories side by side",
        "One row per run directory: runs that broke, mean test accuracy and median final "
        "loss of the runs that held, mean optimizer state, largest peak memory and largest "
        "peak tensor memory above the model's own (MB).",
    )
    head = ("source", "dtypes", "runs", "broke", "mean accuracy", "median final loss")
    head += ("mean optimizer state (MB)", "largest peak memory (MB)")
    head += ("largest peak tensor memory (MB)", "median step time (ms)")
    rows = []
    for src in data.sources:
        s = src.summary
        broken = s.apply(is_broken, axis=1) if len(s) else pd.Series(dtype=bool)
        ok = s[~broken] if len(s) else s

        def stat(frame: pd.DataFrame, column: str, how: str, scale: float = 1.0) -> str:
            if column not in frame or frame[column].dropna().empty:
                return '<td class="num" data-v="">–</td>'
            v = float(getattr(frame[column].dropna().astype(float), how)()) * scale
            return f'<td class="num" data-v="{v!r}">{v:.4g}</td>'

        dtypes = ", ".join(sorted(s["dtype"].astype(str).unique())) if len(s) else ""
        cells = [
            f"<td>{html.escape(src.label)}</td>",
            f"<td>{html.escape(dtypes)}</td>",
            f'<td class="num" data-v="{len(s)}">{len(s)}</td>',
            f'<td class="num" data-v="{int(broken.sum())}">{int(broken.sum())}</td>',
            stat(ok, "accuracy", "mean"),
            stat(ok, "final_loss", "median"),
            stat(s, "optimizer_state_bytes", "mean", 1e-6),
            stat(s, "peak_memory_bytes", "max", 1e-6),
            stat(s, "peak_tensor_bytes", "max", 1e-6),
            stat(s, "step_time_ms", "median"),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    sec.html = data_table("sources-table", head, rows, scroll=False)
    return sec


MAX_EVENT_ROWS = 500
"""Precision events listed at most (the records keep them all)."""


def precision_events_table(data: ReportData) -> Section:
    """Every dtype change of a ``precision="auto"`` optimizer (the ``precision`` records):
    run, step, layer, factor, the new dtype and the reading that crossed its bound."""
    sec = Section(
        "precision-events",
        "Precision escalations",
        'Each row is one factor widened by precision="auto" before its dtype failed: '
        "the reading that crossed its bound (condition: kappa x eps; amax, min_diagonal: "
        "the value; nonfinite, failed: 1) and the dtype it moved to (docs/precision.md).",
    )
    rec = data.records
    rec = rec[rec["probe"] == "precision"]
    if rec.empty:
        sec.empty = "No factor changed dtype (no +auto optimizer, or none needed to)."
        return sec
    rec = rec.astype({c: str for c in rec.select_dtypes("category").columns})
    rec = rec.sort_values(["key", "step"], kind="stable")
    multi = len(data.sources) > 1
    head = ["run", "step", "layer", "factor", "to dtype", "reading", "value"]
    rows = []
    for r in rec.head(MAX_EVENT_ROWS).itertuples():
        run = r.key if multi else r.run
        cells = [html.escape(str(v)) for v in (run, r.step, r.module, r.tensor, r.dtype, r.metric)]
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + _cell(r.value, 1.0) + "</tr>"
        )
    sec.html = data_table("precision-events-table", head, rows)
    if len(rec) > MAX_EVENT_ROWS:
        sec.notes = [f"The first {MAX_EVENT_ROWS} of {len(rec)} events; records.parquet has all."]
    return sec


ENVIRONMENT_FIELDS = ("device", "versions", "seeds", "dtypes", "modes", "optimizers")
"""config.json keys shown first (after the command); the others follow, the suite last."""


def _suite(suite: object) -> str:
    """The suite as its TOML text where config.json holds it, else as JSON."""
    if isinstance(suite, dict) and isinstance(suite.get("text"), str):
        head = ", ".join(f"{k}: {v}" for k, v in suite.items() if k != "text")
        return f"{html.escape(head)}<pre>{html.escape(suite['text'])}</pre>"
    text = suite if isinstance(suite, str) else json.dumps(suite, indent=1)
    return f"<pre>{html.escape(text)}</pre>"


def _pretty(value: object) -> str:
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_pretty(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


def environment_table(data: ReportData) -> Section:
    """Each source's config.json: versions, device, seeds and the exact command."""
    sec = Section(
        "environment",
        "Environment",
        "Where and how each run directory was produced, from its config.json: rerun the "
        "command with the same versions and device to reproduce it.",
    )
    blocks = []
    for src in data.sources:
        if src.config is None:
            blocks.append(
                f"<h3>{html.escape(src.label)}</h3><p class='empty'>This run directory has "
                "no config.json.</p>"
            )
            continue
        cfg = src.config
        command = cfg.get("command", "")
        if isinstance(command, list):
            command = " ".join(str(c) for c in command)
        first = [k for k in ENVIRONMENT_FIELDS if k in cfg]
        rest = sorted(k for k in cfg if k not in (*ENVIRONMENT_FIELDS, "command", "suite"))
        rows = [
            f"<tr><th>command</th><td><code>{html.escape(str(command))}</code></td></tr>",
            *(
                f"<tr><th>{html.escape(k)}</th><td>{_pretty(cfg[k])}</td></tr>"
                for k in (*first, *rest)
            ),
        ]
        if "suite" in cfg:
            rows.append(f"<tr><th>suite</th><td>{_suite(cfg['suite'])}</td></tr>")
        blocks.append(
            f"<h3>{html.escape(src.label)}</h3><table class='data'>{''.join(rows)}</table>"
        )
    sec.html = "\n".join(blocks)
    return sec
