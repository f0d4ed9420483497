"""Issue 19's report side on a real stress run: escalation figures in the summary, the
terminal and the report; the what-if table; the headroom heatmap; all drawn in chromium.

The run: the quick suite's MLP on its baseline scenario in float16 with
``kfac:cholesky+auto`` (float16 KFAC factors cross their condition bound at the first
update, docs/precision.md) and AdamW, 9 steps with the costly readings every 4 steps, so
the last step (8) is a reading: the what-if rows of that step see the factors as the run
ends.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.report.data import ReportData, RunSource, load_report_data
from precision_lab.report.headroom import LOW, headroom_cells, headroom_heatmap
from precision_lab.report.whatif import unit_roundoff, verdict, whatif_cells, whatif_table
from precision_lab.report.write import build_sections
from probes.records import Recorder
from tests.precision_lab import browser

KFAC_AUTO = "kfac:cholesky+auto"
FACTORS = ("A", "G", "A_inv", "G_inv")


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("auto") / "run"
    args = ["stress", "--suite", "quick", "--dtype", "fp16", "--scenarios", "baseline"]
    args += ["--optimizers", f"{KFAC_AUTO},adamw", "--steps", "9", "--every", "4"]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def data(auto_run) -> ReportData:
    return load_report_data([auto_run[0]])


def _runs(path: Path) -> dict[str, dict]:
    return {r["run"]: r for r in json.loads((path / "summary.json").read_text())["runs"]}


def test_summary_escalation_figures_match_the_records(auto_run, data):
    runs = _runs(auto_run[0])
    rec = data.records.astype({"probe": str, "metric": str, "tensor": str, "dtype": str})
    kfac = runs[f"mlp/baseline/{KFAC_AUTO}/float16/pure/s0"]
    assert kfac["precision_events"] > 0
    for run in runs.values():
        if run["optimizer"] == "adamw":
            assert run["precision_events"] is None and run["promoted_bytes"] is None
            continue
        mine = rec[rec["run"] == run["run"]]
        assert run["precision_events"] == (mine["probe"] == "precision").sum()
        # The last step (8) is a what-if reading: each factor's stored dtype and bytes.
        stored = mine[
            (mine["metric"] == "stored_bytes") & (mine["step"] == 8) & mine["tensor"].isin(FACTORS)
        ]
        start = run["dtype"]
        wider = stored[stored["dtype"] != start]
        assert run["promoted_fraction"] == pytest.approx(len(wider) / len(stored))
        growth = {
            d: 1 - torch.finfo(getattr(torch, start)).bits / torch.finfo(getattr(torch, d)).bits
            for d in set(wider["dtype"])
        }
        extra = sum(v * growth[d] for v, d in zip(wider["value"], wider["dtype"], strict=True))
        assert run["promoted_bytes"] == extra
    assert kfac["promoted_bytes"] > 0 and 0 < kfac["promoted_fraction"] <= 1


def test_terminal_table_shows_escalations(auto_run):
    runs, output = _runs(auto_run[0]), auto_run[1]
    assert "escalated" in output
    kfac = runs[f"mlp/baseline/{KFAC_AUTO}/float16/pure/s0"]
    shown = f"{kfac['precision_events']} ({kfac['promoted_fraction']:.0%})"
    line = next(ln for ln in output.splitlines() if KFAC_AUTO in ln and "float16 " in ln)
    assert shown in line


def test_verdict_rules():
    u = unit_roundoff("bfloat16")
    assert u == 2.0**-8
    assert verdict(0.0, 0.0, u, "bfloat16") == "yes"
    assert verdict(0.1, 0.0, u, "bfloat16") == "underflow"
    assert verdict(0.1, 0.0, 1.01 * u, "bfloat16") == "no"
    assert verdict(0.0, 1e-6, 0.0, "bfloat16") == "no"
    assert unit_roundoff("float8_e4m3fn") == 2.0**-4


def test_whatif_cells_are_the_worst_readings(data):
    cells = whatif_cells(data)
    rec = data.records.astype({c: str for c in data.records.select_dtypes("category").columns})
    rec = rec[rec["probe"] == "whatif"]
    assert set(cells["optimizer"]) == {KFAC_AUTO, "adamw"}
    assert set(cells[cells["optimizer"] == KFAC_AUTO]["tensor"]) >= set(FACTORS)
    for cell in cells.itertuples():
        stored = rec[(rec["metric"] == "stored_bytes") & (rec["dtype"] == cell.stored_dtype)]
        stored = stored[stored["tensor"] == cell.tensor]
        keys = data.summary[data.summary["optimizer"] == cell.optimizer]["key"]
        at = stored[stored["key"].isin(keys)][["key", "step", "module"]]
        considered = rec[(rec["dtype"] == cell.dtype) & (rec["tensor"] == cell.tensor)]
        considered = considered.merge(at, on=["key", "step", "module"])
        worst = considered.groupby("metric")["value"].max()
        assert cell.underflow == worst["underflow_fraction"]
        assert cell.overflow == worst["overflow_fraction"]
        assert cell.verdict == verdict(
            cell.underflow, cell.overflow, np.nan_to_num(cell.rounding), cell.dtype
        )
        assert cell.dtype != cell.stored_dtype
    # Saving: a float32 tensor cast to bfloat16 saves half its bytes.
    half = cells[(cells["stored_dtype"] == "float32") & (cells["dtype"] == "bfloat16")]
    assert not half.empty
    assert (half["bytes_saved"] == half["stored_bytes"] / 2).all()
    table = whatif_table(data).html
    assert table.count("<tr>") == 1 + len(cells.groupby(["optimizer", "tensor", "stored_dtype"]))


def _by_hand() -> ReportData:
    """One float16 run with readings whose headroom is known exactly."""
    tiny = torch.finfo(torch.float16).tiny
    rec = Recorder(run="r")
    rec.add(0, "numerics", "amax", 2.0**10, module="0", tensor="A", dtype="float16")  # 5.99
    rec.add(0, "numerics", "min_nonzero", tiny * 8, module="0.weight", tensor="weight")  # 3
    rec.add(0, "numerics", "min_nonzero", tiny / 32, module="0", tensor="activation")  # ignored
    rec.add(0, "condition", "condition_number", 2.0**5, module="0", tensor="A", dtype="float16")
    rec.add(0, "condition", "condition_number", 2.0**9, module="0", tensor="A_inv")  # ignored
    rec.add(5, "numerics", "nan_count", 3.0, module="2", tensor="grad", dtype="float16")
    rec.add(5, "numerics", "amax", 1.0, module="2.bias", tensor="update", dtype="float16")
    summary = pd.DataFrame([{"run": "r", "dtype": "float16", "optimizer": "kfac:cholesky"}])
    source = RunSource("src", Path("."), summary, rec.to_frame(), None)
    return ReportData([source])


def test_headroom_against_hand_computed_readings():
    cells = headroom_cells(_by_hand()).set_index(["layer", "step"])
    # Layer 0 at step 0: amax 2^10 vs 65504 (5.999), weight's smallest 2^3 above tiny (3),
    # condition 2^5 vs 1/eps = 2^10 (5): the weight's 3 is the least.
    first = cells.loc[("0", 0)]
    assert first["headroom"] == pytest.approx(3.0) and first["tensor"] == "weight"
    assert first["reading"] == "min_nonzero"
    # Layer 2 at step 5: a NaN in the gradient, no headroom at all.
    assert cells.loc[("2", 5), "headroom"] == -math.inf
    assert set(cells.index) == {("0", 0), ("2", 5)}
    trace = headroom_heatmap(_by_hand()).figure["data"][0]
    assert trace["y"] == ["0", "2"] and trace["x"] == ["0", "5"]
    assert trace["z"] == [[pytest.approx(3.0), None], [None, LOW]]
    assert trace["text"][1][1] == "NaN/Inf"


def test_headroom_offers_the_worst_run_first(data):
    cells = headroom_cells(data)
    sec = headroom_heatmap(data)
    buttons = sec.figure["layout"]["updatemenus"][0]["buttons"]
    assert len(buttons) == len(sec.figure["data"]) == cells["key"].nunique()
    least = cells.groupby("key")["headroom"].min()
    first = sec.figure["data"][0]
    assert first["visible"] and least[first["name"]] == least.min()
    assert [t["visible"] for t in sec.figure["data"]].count(True) == 1


@browser.requires_chromium
@pytest.mark.browser
def test_table_heatmap_and_events_render_in_chromium(auto_run):
    page = auto_run[0] / "report.html"
    html = page.read_text()
    loaded = browser.load(page)
    assert loaded.errors == [], loaded.errors
    assert "could not be built" not in loaded.dom
    rendered = re.search(r'data-figures-rendered="(\d+)"', loaded.dom)
    assert rendered and int(rendered.group(1)) == html.count('class="figure-spec"')
    heatmap = re.search(
        r'<div id="fig-headroom".*?(?=<script type="application/json")', loaded.dom, re.S
    )
    assert heatmap, "the headroom heatmap is missing"
    drawn = heatmap.group(0)
    assert "js-plotly-plot" in drawn and 'class="main-svg"' in drawn and "updatemenu" in drawn
    assert "least" in drawn  # the dropdown's run labels
    table = re.search(
        r'<table class="data sortable" id="whatif-table">.*?</table>', loaded.dom, re.S
    )
    assert table, "the what-if table is missing"
    assert table.group(0).count("whatif-") >= 4 and "A_inv" in table.group(0)
    events = re.search(r'id="precision-events-table".*?</table>', loaded.dom, re.S)
    assert events and events.group(0).count("<tr>") > 1
    sections = {s.key for s in build_sections(load_report_data([auto_run[0]]))}
    assert {"headroom", "whatif", "precision-events"} <= sections
