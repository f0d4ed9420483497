"""The report's what-if table: could this optimizer's state live in a narrower dtype?

Read from the ``whatif`` probe's rows (docs/CONTRACTS.md; `probes.whatif`): for every
optimizer-state tensor (a factor by its name and role, a momentum, AdamW's moments) and
every dtype considered (float16, bfloat16, float8 e4m3, float8 e5m2), the fraction of
nonzero values that would underflow, the fraction that would overflow, the relative
rounding error of the cast and the bytes it would save, against the tensor's own
``stored_bytes``. One row per (optimizer, tensor, stored dtype), worst over the layers,
the recorded steps and the runs (scenarios, models, seeds) of the suite; one column per
dtype considered.

The verdict of a cell, arithmetic rather than tuning (``u``: the considered dtype's unit
roundoff, ``eps / 2``):

- **no** when any value would overflow (it would become inf, or NaN in e4m3, which has
  no inf, and poison every product it enters), or when the relative rounding error
  exceeds ``u``: a value in the normal range is rounded by at most ``u`` of itself, so
  the error of the whole tensor is at most ``u`` of its norm unless values fall below the
  smallest normal number; an error above ``u`` means underflow costs more than the
  dtype's own rounding;
- **underflow** when nothing overflows and the error stays within ``u``, but some values
  would become subnormal or zero: harmless for the norm, yet a small diagonal entry of a
  factor carries a whole direction's scale (`singd.optim.precision`'s underflow bound);
- **yes** otherwise.

Bytes saved: per run, summed over the layers at the last recorded step, median over the
runs of the row (a ``precision="auto"`` run may have widened the tensor since).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import pandas as pd
import torch

from precision_lab.report.page import Section, data_table
from singd.curvature import KFAC_ROLES, SINGD_ROLES

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

CONSIDERED = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
"""The dtypes of `probes.whatif.WHATIF_DTYPES`, as the rows name them, in column order."""
SHOWN = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8 e4m3",
    "float8_e5m2": "fp8 e5m2",
}
STATE_ROLES = {
    "momentum_buffer": "heavy-ball momentum",
    "exp_avg": "Adam first moment",
    "exp_avg_sq": "Adam second moment",
}
VERDICTS = ("yes", "underflow", "no")
"""Cell verdicts, best first (their index is the cell's sort key)."""


def role(tensor: str) -> str:
    """A state tensor's role in words: ``K`` -> ``input preconditioner``."""
    roles = SINGD_ROLES | KFAC_ROLES
    if tensor in roles:
        return f"{roles[tensor].side} {roles[tensor].kind}"
    return STATE_ROLES.get(tensor, "")


def unit_roundoff(dtype: str) -> float:
    """``eps / 2`` of a dtype named as the records name it (``float8_e4m3fn``)."""
    return torch.finfo(getattr(torch, dtype)).eps / 2


def verdict(underflow: float, overflow: float, rounding: float, dtype: str) -> str:
    """``yes``, ``underflow`` or ``no`` for the worst readings of one cell (module doc)."""
    if overflow > 0 or rounding > unit_roundoff(dtype):
        return "no"
    return "underflow" if underflow > 0 else "yes"


def whatif_cells(data: ReportData) -> pd.DataFrame:
    """One row per (source, optimizer, tensor, stored dtype, considered dtype): the worst
    ``underflow``, ``overflow`` (fractions), ``rounding`` (relative), the median
    ``bytes_saved`` and ``stored_bytes`` per run (B), ``runs`` and the ``verdict``."""
    rec = data.records
    rec = rec[rec["probe"] == "whatif"]
    columns = ["source", "optimizer", "tensor", "stored_dtype", "dtype", "underflow"]
    columns += ["overflow", "rounding", "bytes_saved", "stored_bytes", "runs", "verdict"]
    if rec.empty:
        return pd.DataFrame(columns=columns)
    rec = rec.astype({c: str for c in rec.select_dtypes("category").columns})
    at = ["key", "step", "module", "tensor"]
    stored = rec[rec["metric"] == "stored_bytes"][[*at, "dtype", "value"]]
    stored = stored.rename(columns={"dtype": "stored_dtype", "value": "stored_bytes"})
    wide = rec[rec["metric"] != "stored_bytes"].pivot_table(
        index=[*at, "dtype"], columns="metric", values="value", aggfunc="first"
    )
    wide = wide.reset_index().merge(stored, on=at, how="left")
    wide["stored_dtype"] = wide["stored_dtype"].fillna("unknown")
    wide = wide[wide["dtype"] != wide["stored_dtype"]]
    wide = wide.merge(data.summary[["key", "source", "optimizer"]], on="key")
    last = wide.groupby("key")["step"].transform("max")
    group = ["source", "optimizer", "tensor", "stored_dtype", "dtype"]
    per_run = (
        wide[wide["step"] == last]
        .groupby([*group, "key"])[["bytes_saved", "stored_bytes"]]
        .sum(min_count=1)
        .groupby(level=group)
        .median()
    )
    worst = wide.groupby(group).agg(
        underflow=("underflow_fraction", "max"),
        overflow=("overflow_fraction", "max"),
        rounding=("rounding_error", "max"),
        runs=("key", "nunique"),
    )
    cells = worst.join(per_run).reset_index()
    cells["verdict"] = [
        verdict(u, o, r, d)
        for u, o, r, d in zip(
            cells["underflow"].fillna(0.0),
            cells["overflow"].fillna(0.0),
            cells["rounding"].fillna(0.0),
            cells["dtype"],
            strict=True,
        )
    ]
    return cells[columns]


def _bytes(value: float) -> str:
    if pd.isna(value):
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _cell(cell: pd.Series | None) -> str:
    if cell is None:
        return '<td data-v="">–</td>'
    rank = VERDICTS.index(cell["verdict"])
    saved = cell["bytes_saved"]
    saving = "saves " + _bytes(saved) if saved > 0 else "saves nothing"
    details = (
        f"underflow {cell['underflow']:.2%} · overflow {cell['overflow']:.2%} · "
        f"error {cell['rounding']:.2g} · {saving}"
    )
    return (
        f'<td class="whatif-{cell["verdict"]}" data-v="{rank}"><b>{cell["verdict"]}</b>'
        f"<br><small>{html.escape(details)}</small></td>"
    )


def whatif_table(data: ReportData) -> Section:
    """Per optimizer and state tensor, whether each narrower dtype would hold it (module
    doc), with the bytes it would save."""
    sec = Section(
        "whatif",
        "What-if dtypes: could the optimizer's state live in a narrower dtype?",
        "One row per optimizer, state tensor and the dtype it was stored in; worst over "
        "layers, recorded steps and runs. yes: no value overflows or underflows; "
        "underflow: some values would become subnormal or zero, rounding error still within "
        "the dtype's unit roundoff; no: a value overflows, or underflow costs more than "
        "rounding. Bytes saved: median per run, summed over layers at the last reading.",
    )
    cells = whatif_cells(data)
    if cells.empty:
        sec.empty = (
            "No what-if readings were recorded (the whatif probe was off: run directories "
            "written before the stress runner turned it on have none)."
        )
        return sec
    multi = len(data.sources) > 1
    head = ["source"] if multi else []
    head += ["optimizer", "state tensor", "role", "stored as", "runs"]
    head += [SHOWN.get(d, d) for d in CONSIDERED]
    rows = []
    keys = ["source", "optimizer", "tensor", "stored_dtype"]
    for (source, optimizer, tensor, stored), g in cells.groupby(keys, sort=True):
        by_dtype = {row["dtype"]: row for _, row in g.iterrows()}
        first = [f"<td>{html.escape(source)}</td>"] if multi else []
        first += [
            f"<td>{html.escape(optimizer)}</td>",
            f"<td><code>{html.escape(tensor)}</code></td>",
            f"<td>{html.escape(role(tensor))}</td>",
            f"<td>{html.escape(SHOWN.get(stored, stored))}</td>",
            f'<td class="num" data-v="{g["runs"].max()}">{g["runs"].max()}</td>',
        ]
        rest = [_cell(by_dtype.get(d)) for d in CONSIDERED]
        rows.append(f"<tr>{''.join(first + rest)}</tr>")
    sec.html = data_table("whatif-table", head, rows)
    return sec
