"""The report of a real ``precision-lab stress`` run: real training, real probes, real
Parquet. The measured memory must sit on the formulas the scaling figure draws.

Every test reads the session's quick suite (``quick_run``: the MLP, SINGD diagonal, KFAC,
AdamW); the ``slow`` variant adds the transformer and hierarchical SINGD (CI runs it).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.memory import model_shape, state_bytes, widened_model
from precision_lab.report.scaling import _measured_factors
from precision_lab.report.write import build_sections, load_report_data
from singd.structures import get_structure
from tests.precision_lab import browser

OPTIMIZERS = "singd:hierarchical15_15/dense,kfac:cholesky,adamw"


@pytest.fixture(
    scope="module", params=["quick", pytest.param("transformer", marks=pytest.mark.slow)]
)
def real_run(request, tmp_path_factory):
    if request.param == "quick":
        return request.getfixturevalue("quick_run")
    out = tmp_path_factory.mktemp("stress") / "run"
    args = ["stress", "--suite", "quick", "--scenarios", "baseline", "--models", "mlp,transformer"]
    args += ["--optimizers", OPTIMIZERS, "--steps", "4", "--every", "2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_stress_writes_the_report_beside_its_data(real_run):
    html = (real_run / "report.html").read_text()
    sections = build_sections(load_report_data([real_run]))
    assert html.count('class="figure-spec"') == sum(s.figure is not None for s in sections)
    summary = json.loads((real_run / "summary.json").read_text())
    for run in summary["runs"]:
        assert run["run"] in html  # every run is a row of the overview table


def test_measured_factor_bytes_sit_on_the_storage_formula(real_run):
    """Every K, C, m_K, m_C, A, G, A_inv, G_inv the probe measured equals
    storage_entries(d) x element size for its layer's dimension: the markers of the
    scaling figure's left panel lie on their lines."""
    data = load_report_data([real_run])
    measured = _measured_factors(data)
    kronecker = data.summary.dropna(subset=["structure"])
    structures = {name for s in kronecker["structure"] for name in s.split("/")}
    assert set(measured["structure"]) == structures
    # every layer of every model has four factors per Kronecker optimizer
    assert len(measured) >= 4 * kronecker["optimizer"].nunique() * 2
    for row in measured.itertuples():
        formula = get_structure(row.structure).storage_entries(int(row.dim)) * row.itemsize
        assert row.bytes == formula, row.label


def test_each_runs_state_equals_the_planner(real_run):
    """The right panel's markers: each run's optimizer_state_bytes (measured by the
    probe after real steps) equals the planner's total for its model, spec and dtype."""
    data = load_report_data([real_run])
    for run in data.summary.itertuples():
        shape = model_shape(widened_model(run.model, 1))
        planned = state_bytes(run.optimizer, shape, getattr(torch, run.dtype))
        assert run.optimizer_state_bytes == sum(planned.values()), run.run


def test_memory_figure_stacks_to_each_optimizers_state(real_run):
    """The stacked segments of each bar add up to the optimizer's measured state, and the
    AdamW reference bar equals the planner's AdamW bytes for the same model."""
    data = load_report_data([real_run])
    fig = next(s.figure for s in build_sections(data) if s.key == "memory")
    stacks: dict[tuple[str, str], float] = {}
    for trace in fig.data:
        for group, opt, mb in zip(trace.x[0], trace.x[1], trace.y, strict=True):
            key = (group, opt)
            stacks[key] = stacks.get(key, 0.0) + float(mb) * 1e6
    for run in data.summary.itertuples():
        group = f"{run.model} {'bf16' if run.dtype == 'bfloat16' else 'fp32'}"
        assert stacks[(group, run.optimizer)] == pytest.approx(run.optimizer_state_bytes, rel=1e-6)
        adamw = state_bytes(
            "adamw", model_shape(widened_model(run.model, 1)), getattr(torch, run.dtype)
        )
        assert stacks[(group, "AdamW (ref)")] == pytest.approx(sum(adamw.values()), rel=1e-6)


def test_every_section_has_data_from_a_real_run(real_run):
    sections = {s.key: s for s in build_sections(load_report_data([real_run]))}
    for key in ("condition", "precision-error", "range", "training", "memory", "scaling"):
        assert sections[key].figure is not None, (key, sections[key].empty)
    if data_broke := load_report_data([real_run]).summary["first_nonfinite_step"].notna().any():
        assert sections["events"].figure is not None
    assert data_broke or "No NaN or Inf" in sections["events"].empty


@pytest.mark.browser
@browser.requires_chromium
def test_real_report_renders_in_chromium(real_run):
    page = browser.load(real_run / "report.html")
    assert page.errors == []
    specs = (real_run / "report.html").read_text().count('class="figure-spec"')
    assert f'data-figures-rendered="{specs}"' in page.dom
