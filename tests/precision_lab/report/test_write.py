"""The HTML report as a file: self-contained, plotly.js once, size bound, the figures'
contents, comparison pages and bad input. What a browser makes of it is in
test_report_browser.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from plotly.offline import get_plotlyjs

from precision_lab.cli import cli
from precision_lab.errors import UsageError
from precision_lab.report.figures import MAX_POINTS_PER_TRACE, Thinning, inverse_eps
from precision_lab.report.write import build_sections, load_report_data, write_report
from probes.records import frame_from_rows, write_parquet
from tests.precision_lab.synthetic_runs import make_run_dir

MB = 1e6


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("runs") / "bf16")


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    return make_run_dir(
        tmp_path_factory.mktemp("runs") / "fp16",
        dtypes=("float32", "float16"),
        broken=("singd:diagonal", "float16", "large-lr"),
        break_step=7,
        seed=1,
    )


@pytest.fixture(scope="module")
def comparison(bf16_run, fp16_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "compare.html"
    write_report([bf16_run, fp16_run], out)
    return out.read_text()


def _figure_specs(html: str) -> dict[str, dict]:
    pattern = (
        r'<script type="application/json" class="figure-spec" data-target="([^"]+)">(.*?)</script>'
    )
    return {m[0]: json.loads(m[1]) for m in re.findall(pattern, html, flags=re.S)}


def _without_scripts(html: str) -> str:
    return re.sub(r"<script\b[^>]*>.*?</script>", "", html, flags=re.S | re.I)


def test_plotly_js_is_inlined_exactly_once(comparison):
    plotly_js = get_plotlyjs()
    assert comparison.count(plotly_js) == 1
    # No figure carries its own copy or a loader of plotly.js.
    assert comparison.count("plotly.js v") == plotly_js.count("plotly.js v")
    assert len(_figure_specs(comparison)) >= 9


def test_page_loads_nothing_from_the_network(comparison):
    tags = _without_scripts(comparison)
    assert not re.search(r"<(script|img|iframe|link)\b[^>]*\b(src|href)\s*=", tags, re.I)
    assert "@import" not in tags and "url(" not in tags
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", comparison, re.I)
    assert "cdn.plot.ly" not in tags and "fonts.googleapis" not in comparison


def test_every_section_has_a_caption_and_a_figure_or_a_reason(bf16_run):
    sections = build_sections(load_report_data([bf16_run]))
    keys = [s.key for s in sections]
    assert keys == [
        "frontiers",
        "overview",
        "stability",
        "events",
        "condition",
        "precision-error",
        "range",
        "training",
        "memory",
        "peak-memory",
        "headroom",
        "precision-events",
        "whatif",
        "scaling",
        "environment",
    ]
    for sec in sections:
        assert sec.caption and sec.caption.endswith(".") and "\n" not in sec.caption
        assert (sec.figure is not None) or sec.html or sec.empty, sec.key


def test_sections_without_data_say_so(tmp_path):
    """An AdamW-only run has no curvature: the factor figures explain, not draw."""
    run = make_run_dir(tmp_path / "adamw", optimizers=("adamw",), broken=None)
    sections = {s.key: s for s in build_sections(load_report_data([run]))}
    assert sections["condition"].figure is None
    assert "No condition numbers" in sections["condition"].empty
    assert sections["precision-error"].figure is None
    assert "No NaN or Inf" in sections["events"].empty
    html = write_report([run], tmp_path / "r.html").read_text()
    assert 'class="empty"' in html and "No condition numbers" in html


def test_a_run_directory_without_runs_still_gets_a_page(tmp_path):
    """A suite interrupted before its first run finished: every figure says why it is
    empty, and the command succeeds."""
    run = make_run_dir(tmp_path / "run", optimizers=("adamw",), steps=2, broken=None)
    (run / "summary.json").write_text('{"schema": 1, "runs": []}')
    write_parquet(frame_from_rows([]), run / "records.parquet")
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    sections = build_sections(load_report_data([run]))
    assert all(s.figure is None for s in sections)
    # The nine figures, the frontiers, the headroom, the escalations and the what-if table.
    assert sum(bool(s.empty) for s in sections) == 13


def test_a_failing_figure_costs_only_its_own_section(bf16_run, tmp_path, monkeypatch):
    import precision_lab.report.write as report

    def broken_figure(data):
        raise KeyError("no_such_column")

    monkeypatch.setattr(report, "FIGURE_BUILDERS", (broken_figure, *report.FIGURE_BUILDERS))
    with pytest.warns(UserWarning, match="broken figure"):
        html = write_report([bf16_run], tmp_path / "r.html").read_text()
    assert "could not be built: KeyError" in html
    assert html.count('class="figure-spec"') == 10  # every other figure is still there


def test_broken_runs_are_highlighted_and_counted(bf16_run, tmp_path):
    html = write_report([bf16_run], tmp_path / "r.html").read_text()
    broken = re.findall(r'<tr class="broken">(.*?)</tr>', html)
    assert len(broken) == 1
    assert "mlp-large-lr-kfac_cholesky-bfloat16-s0" in broken[0]
    assert "12 runs, 1 broke" in html


def test_stability_heatmap_marks_the_breaking_cell(bf16_run):
    sections = {s.key: s for s in build_sections(load_report_data([bf16_run]))}
    fig = sections["stability"].figure
    status, broke = fig.data
    i = list(broke.y).index("kfac:cholesky")
    j = list(broke.x).index("large-lr · bf16")
    assert broke.z[i][j] == 23
    assert np.isnan(status.z[i][j])
    # every other cell is "stable": drawn by the status layer with 0
    assert np.count_nonzero(~np.isnan(np.asarray(broke.z, dtype=float))) == 1
    assert np.nansum(np.asarray(status.z, dtype=float)) == 0


def test_condition_figure_draws_each_dtypes_inverse_eps_and_the_worst_layer(bf16_run):
    data = load_report_data([bf16_run])
    spec = next(s.figure for s in build_sections(data) if s.key == "condition")
    levels = {t["name"]: t["y"][0] for t in spec["data"] if t["name"].startswith("1/eps")}
    assert levels == {"1/eps bf16": 128.0, "1/eps fp32": 2.0**23}
    assert inverse_eps("float16") == 1024.0
    assert spec["layout"]["yaxis"]["type"] == "log"
    # The baseline bf16 SINGD line for K is, step by step, the largest over the layers.
    rec = data.records
    rec = rec[
        (rec["run"] == "mlp-baseline-singd_diagonal-bfloat16-s0")
        & (rec["metric"] == "condition_number")
        & (rec["tensor"] == "K")
    ]
    expected = rec.groupby("step", observed=True)["value"].max()
    line = next(
        t
        for t in spec["data"]
        if t["name"] == "bf16 K"
        and "baseline" in t["hovertemplate"]
        and t["xaxis"] == _axis_of(spec, "singd:diagonal")
    )
    np.testing.assert_array_equal(line["x"], expected.index.to_numpy())
    np.testing.assert_allclose(line["y"], expected.to_numpy(), rtol=1e-7)  # float32 display


def _axis_of(spec: dict, title: str) -> str:
    """The x axis id of the subplot titled ``title``."""
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    index = titles.index(title)
    return "x" if index == 0 else f"x{index + 1}"


def test_comparison_page_holds_both_sources(comparison):
    assert "<b>bf16</b>" in comparison and "<b>fp16</b>" in comparison
    table = re.search(
        r'<table class="data sortable" id="overview-table".*?</table>', comparison, re.S
    ).group(0)
    assert table.count("<td>bf16</td>") == 12 and table.count("<td>fp16</td>") == 12
    stability = _figure_specs(comparison)["fig-stability"]
    columns = set(stability["data"][0]["x"])
    assert {c.split(" · ")[0] for c in columns} == {"bf16", "fp16"}
    # the fp16 source's break at step 7 and the bf16 source's at 23 are both drawn
    assert "step 7" in json.dumps(stability) and "step 23" in json.dumps(stability)


def test_comparison_page_opens_with_the_directories_side_by_side(comparison, bf16_run):
    table = re.search(
        r'<table class="data sortable" id="sources-table">.*?</table>', comparison, re.S
    )
    rows = re.findall(
        r"<tr><td>(.*?)</td><td>(.*?)</td>.*?data-v=\"(\d+)\".*?data-v=\"(\d+)\"", table.group(0)
    )
    assert rows == [
        ("bf16", "bfloat16, float32", "12", "1"),
        ("fp16", "float16, float32", "12", "1"),
    ]
    assert comparison.index('id="side-by-side"') < comparison.index('id="overview"')
    single = [s.key for s in build_sections(load_report_data([bf16_run]))]
    assert "side-by-side" not in single


def test_before_and_after_of_one_dtype_stay_apart(bf16_run, tmp_path):
    """Two run directories of the same dtype (a before/after comparison): every curve's
    legend names its directory, and the two directories' bf16 lines differ in colour."""
    after = make_run_dir(tmp_path / "after", broken=None, seed=3)
    data = load_report_data([bf16_run, after])
    spec = next(s.figure for s in build_sections(data) if s.key == "training")
    colors = {}
    for trace in spec["data"]:
        assert trace["name"].endswith(("[bf16]", "[after]")), trace["name"]
        colors.setdefault(trace["name"], set()).add(trace["line"]["color"])
    assert all(len(c) == 1 for c in colors.values())
    assert colors["adamw bf16 [bf16]"] != colors["adamw bf16 [after]"]


def test_thinning_keeps_every_bucket_extreme():
    """Against a slow reference: each bucket's min and max are among the kept points,
    spikes survive, short traces pass untouched, and the note says what happened."""
    rng = np.random.default_rng(0)
    n = 5000
    x = np.arange(n, dtype=np.int32)
    y = rng.normal(size=n).astype(np.float32)
    y[1234] = 1e6  # a spike
    y[4000:4100] = np.nan
    thin = Thinning(traces=1)
    tx, ty = thin(x, y)
    assert len(tx) <= MAX_POINTS_PER_TRACE and np.all(np.diff(tx) > 0)
    edges = np.linspace(0, n, MAX_POINTS_PER_TRACE // 2 + 1).astype(int)
    kept = set(tx.tolist())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        seg = y[lo:hi]
        if np.isfinite(seg).any():
            assert lo + int(np.nanargmax(seg)) in kept and lo + int(np.nanargmin(seg)) in kept
    assert 1234 in kept
    sx, sy = thin(x[:50], y[:50])
    assert sx is x[:50].base or np.array_equal(sx, x[:50])
    assert thin.thinned == 1 and "records.parquet keeps every point" in thin.notes()[0]


def test_long_runs_are_thinned_with_a_note_and_stay_small(tmp_path):
    run = make_run_dir(
        tmp_path / "long",
        optimizers=("adamw",),
        dtypes=("bfloat16",),
        scenarios=("baseline",),
        steps=1500,
        broken=None,
    )
    html = write_report([run], tmp_path / "long.html").read_text()
    assert "Downsampled for display" in html
    loss = _figure_specs(html)["fig-training"]
    assert all(len(_decoded(t["x"])) <= MAX_POINTS_PER_TRACE for t in loss["data"])


def _decoded(array) -> np.ndarray:
    """Plotly's JSON holds numpy arrays as base64 typed arrays."""
    import base64

    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
    return np.asarray(array)


def test_default_suite_sized_report_stays_under_8_mb(tmp_path):
    """More than the default suite (its frontiers: damping on 8 rungs and input_scale on 6
    for the MLP, damping for the CNN, about 350 runs with the float32 controls): MLP and
    transformer x 14 rungs x 7 optimizers x 2 dtypes = 392 runs of the default 40 steps,
    28 views of the per-step figures, each carrying its visibility per trace."""
    rungs = [f"damping={10.0**-k:g}" for k in range(1, 9)]
    rungs += [f"input_scale={4**k}" for k in range(2, 8)]
    run = make_run_dir(
        tmp_path / "default",
        models=("mlp", "transformer"),
        scenarios=tuple(rungs),
        optimizers=(
            "singd:diagonal",
            "kfac:cholesky",
            "adamw",
            "singd:dense",
            "singd:hierarchical15_15",
            "ikfac",
            "kfac:newton-schulz",
        ),
        broken=("kfac:cholesky", "bfloat16", "damping=1e-06"),
        steps=40,
    )
    out = write_report([run], tmp_path / "default.html")
    assert out.stat().st_size < 8 * MB


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: (p / "summary.json").unlink(), "has no summary.json"),
        (lambda p: (p / "summary.json").write_text("{not json"), "is not valid JSON"),
        (lambda p: (p / "summary.json").write_text('{"runs": 3}'), "not a precision-lab summary"),
        (lambda p: (p / "records.parquet").write_bytes(b"PAR1 garbage"), "not a readable Parquet"),
        (lambda p: (p / "records.parquet").unlink(), "has no records.parquet"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "must be an object"),
    ],
)
def test_corrupt_run_directories_are_one_sentence(tmp_path, damage, fragment):
    run = make_run_dir(tmp_path / "run", optimizers=("adamw",), steps=5, broken=None)
    damage(run)
    with pytest.raises(UsageError, match=fragment):
        load_report_data([run])
    result = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert fragment.split("'")[0] in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_report_usage_errors(tmp_path, bf16_run):
    runner = CliRunner()
    missing = runner.invoke(cli, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    two = runner.invoke(cli, ["report", str(bf16_run), str(bf16_run)])
    assert two.exit_code == 2 and "-o FILE.html" in two.output
    none = runner.invoke(cli, ["report"])
    assert none.exit_code == 2
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritable = runner.invoke(cli, ["report", str(bf16_run), "-o", str(blocked / "r.html")])
    assert unwritable.exit_code == 2 and "Cannot write the report" in unwritable.output


def test_cli_report_writes_one_file_and_says_where(tmp_path, bf16_run, fp16_run):
    out = tmp_path / "sub" / "cmp.html"
    result = CliRunner().invoke(cli, ["report", str(bf16_run), str(fp16_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and out.stat().st_size > 4 * MB
    assert "bf16 vs fp16" in out.read_text()[:6000]


def test_peak_memory_figure_shows_each_models_largest_tensor_peak(bf16_run):
    """Left: per (model, optimizer) and dtype the largest peak_tensor_bytes over runs, in
    MB on a log axis; right: the process or device peak the same way."""
    data = load_report_data([bf16_run])
    fig = {s.key: s for s in build_sections(data)}["peak-memory"].figure
    s = data.summary
    for column, axis in (("peak_tensor_bytes", "x"), ("peak_memory_bytes", "x2")):
        traces = [t for t in fig.data if t.xaxis == axis]
        assert {t.name for t in traces} == {"bf16", "fp32"}
        for trace in traces:
            dtype = "bfloat16" if trace.name == "bf16" else "float32"
            expected = s[s["dtype"] == dtype].groupby(["model", "optimizer"])[column].max()
            drawn = dict(zip(zip(*trace.x, strict=True), _decoded(trace.y), strict=True))
            assert drawn.keys() == set(expected.index)
            for key, value in expected.items():
                assert drawn[key] == pytest.approx(value / MB, rel=1e-6)
    assert fig.layout.yaxis.type == "log"
