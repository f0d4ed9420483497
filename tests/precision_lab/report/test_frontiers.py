"""The report's opening: a frontier figure and one sentence per knob, both from the runs;
and the per-step figures, one model and scenario (or rung) at a time.

Run directories are written with the frontier schema (tests/precision_lab/frontier_runs.py):
each rung a real run object beside its float32 control, read back through `read_run`.
"""

from __future__ import annotations

import html
import re

import pytest

from precision_lab.report.data import load_report_data
from precision_lab.report.frontiers import STATUS_STYLE, frontier_rows, frontier_sections
from precision_lab.report.write import build_sections, write_report
from tests.precision_lab.frontier_runs import frontier_runs, write_frontier_dir

INPUT_SCALE = (1.0, 16.0, 256.0, 4096.0, 65536.0)


@pytest.fixture(scope="module")
def frontier_dir(tmp_path_factory):
    runs = frontier_runs(
        {
            "kfac:cholesky": ("HHHBBB", "HHHHHB"),  # costs 2 rungs
            "singd:diagonal": ("HHHHHH", "HHHHHH"),  # held everywhere
            "ikfac": ("HHBBBB", "HHBBBB"),  # breaks where float32 does
        }
    )
    runs += frontier_runs(
        {"kfac:cholesky": ("HHBBB", "HHHHH"), "adamw": ("BBBBB", "BBBBB")},
        knob="input_scale",
        ladder=INPUT_SCALE,
    )
    path = tmp_path_factory.mktemp("frontiers") / "run"
    return write_frontier_dir(path, runs, records=True)


def sentence(path, knob: str) -> str:
    section = next(s for s in frontier_sections(load_report_data([path])) if knob in s.key)
    found = re.findall(r'<p class="finding"><b>Found:</b> (.*?)</p>', section.html)
    assert len(found) == 1
    return html.unescape(found[0])


def test_the_report_opens_with_one_frontier_section_per_knob(frontier_dir):
    keys = [s.key for s in build_sections(load_report_data([frontier_dir]))]
    assert keys[:3] == ["frontier-damping", "frontier-input-scale", "overview"]
    page = write_report([frontier_dir], frontier_dir / "report.html").read_text()
    first_section = page.index("<section")
    assert page.index('<section id="frontier-damping"') == first_section
    assert page.index("On the damping ladder") < page.index('id="overview"')


def test_one_sentence_per_knob_says_what_was_found(frontier_dir):
    assert sentence(frontier_dir, "damping") == (
        "On the damping ladder (0.1 .. 1e-06, 6 rungs): on the mlp in bfloat16, "
        "kfac:cholesky breaks at 0.0001 where float32 breaks at 1e-06 (cost 2 rungs); "
        "singd:diagonal holds on every rung, as float32 does (cost 0); "
        "ikfac breaks at 0.001, as float32 does (cost 0)."
    )
    assert sentence(frontier_dir, "input") == (
        "On the input_scale ladder (1 .. 65536, 5 rungs): on the mlp in bfloat16, "
        "kfac:cholesky breaks at 256 where float32 holds on every rung (cost at least "
        "3 rungs); adamw breaks already at the mildest rung (1) in float32 too: this ladder "
        "says nothing about the dtype."
    )


@pytest.mark.parametrize(
    ("patterns", "words"),
    [
        (
            {"sgd": ("HHHHHH", "HHBBBB")},
            "sgd holds on every rung where float32 breaks at 0.001 "
            "(float32 broke first, 4 rungs earlier)",
        ),
        (
            {"sgd": ("HHHHBB", "HHBBBB")},
            "sgd breaks at 1e-05, later than float32 at 0.001 "
            "(float32 broke first, 2 rungs earlier)",
        ),
        ({"sgd": ("HBHBBB", "HHHHHH")}, "(cost at least 5 rungs; not monotone: it held again"),
        (
            {"sgd": ("HHHBBB", "HNNNNB")},
            "(cost 2 rungs; float32 did not learn at 0.0001, so that rung says nothing of "
            "the dtype, nor at 0.01, 0.001, 1e-05)",
        ),
        ({"sgd": ("HHMBBB", "HHHHHB")}, "sgd's breaking point is unknown (0.001 did not run)"),
        (
            {"sgd": ("HHHHHB", "HHHHHH")},
            "sgd breaks at 1e-06 where float32 holds on every rung (cost at least 1 rung).",
        ),
        (
            {"sgd": ("BBBBBB", "HHHHHB")},
            "sgd breaks at 0.1 where float32 breaks at 1e-06 (cost at least 5 rungs)",
        ),
    ],
)
def test_honest_wording_for_every_kind_of_frontier(tmp_path, patterns, words):
    path = write_frontier_dir(tmp_path / "run", frontier_runs(patterns), records=True)
    assert words in sentence(path, "damping")


def test_optimizers_that_found_the_same_are_said_together(tmp_path):
    patterns = {
        "singd:dense": ("HHHHHH", "HHHHHH"),
        "kfac:cholesky": ("HHHBBB", "HHHHHB"),
        "singd:diagonal": ("HHHHHH", "HHHHHH"),
        "kfac:eigh": ("HHHBBB", "HHHHHB"),
        "ikfac": ("HHHHHH", "HHHHHH"),
    }
    path = write_frontier_dir(tmp_path / "run", frontier_runs(patterns), records=True)
    assert sentence(path, "damping") == (
        "On the damping ladder (0.1 .. 1e-06, 6 rungs): on the mlp in bfloat16, "
        "singd:dense, singd:diagonal and ikfac hold on every rung, as float32 does (cost 0); "
        "kfac:cholesky and kfac:eigh break at 0.0001 where float32 breaks at 1e-06 "
        "(cost 2 rungs)."
    )


def test_over_seeds_the_sentence_gives_the_median_and_each_seed(tmp_path):
    runs = []
    for seed, pattern in enumerate(("HHHBBB", "HHBBBB", "HHHBBB")):
        runs += frontier_runs({"kfac:cholesky": (pattern, "HHHHHB")}, seed=seed)
    path = write_frontier_dir(tmp_path / "run", runs, records=True)
    assert sentence(path, "damping").endswith(
        "kfac:cholesky breaks at a median of 0.0001 where float32 breaks at a median of "
        "1e-06 (cost 2 rungs; over 3 seeds, breaking at 0.0001, 0.001, 0.0001)."
    )
    (row,) = frontier_rows(load_report_data([path]))
    assert row.seeds == [0, 1, 2] and row.median_cost == 2


def _traces(section) -> list[dict]:
    return section.figure["data"]


def test_the_figure_draws_every_rung_with_its_status_and_the_breaking_points(frontier_dir):
    section = next(s for s in frontier_sections(load_report_data([frontier_dir])))
    layout = section.figure["layout"]
    rows = dict(zip(layout["yaxis"]["tickvals"], layout["yaxis"]["ticktext"], strict=True))
    # each optimizer's row in the dtype, its float32 control's right under it
    assert list(rows.values()) == [
        "kfac:cholesky · bf16",
        "kfac:cholesky · fp32 control",
        "singd:diagonal · bf16",
        "singd:diagonal · fp32 control",
        "ikfac · bf16",
        "ikfac · fp32 control",
    ]
    assert layout["xaxis"]["ticktext"] == ["0.1", "0.01", "0.001", "0.0001", "1e-05", "1e-06"]
    markers = {t["name"]: t for t in _traces(section) if t["mode"] == "markers"}
    assert set(markers) == {"held", "broke"}
    drawn = {
        (rows[y], x, name)
        for name, t in markers.items()
        for x, y in zip(t["x"], t["y"], strict=True)
    }
    assert len(drawn) == 6 * 6  # every rung of every row, once
    assert ("kfac:cholesky · bf16", 3, "broke") in drawn
    assert ("kfac:cholesky · bf16", 2, "held") in drawn
    assert ("kfac:cholesky · fp32 control", 4, "held") in drawn
    # colour and symbol both tell the statuses apart (readable without colour)
    assert len({style[1] for style in STATUS_STYLE.values()}) == len(STATUS_STYLE)
    assert len({style[2] for style in STATUS_STYLE.values()}) == len(STATUS_STYLE)
    assert markers["broke"]["marker"]["symbol"] != markers["held"]["marker"]["symbol"]
    # breaking points: a bar before the first broken rung of each row that broke
    (bars,) = [t for t in _traces(section) if t.get("name") == "breaking point"]
    segments = {
        (bars["x"][i], rows[round(bars["y"][i] + 0.42)]) for i in range(0, len(bars["x"]), 3)
    }
    assert segments == {
        (2.5, "kfac:cholesky · bf16"),
        (4.5, "kfac:cholesky · fp32 control"),
        (1.5, "ikfac · bf16"),
        (1.5, "ikfac · fp32 control"),
    }
    costs = next(t for t in _traces(section) if t["mode"] == "text")["text"]
    assert costs == ["cost 2", "cost 0", "cost 0"]


def test_no_learning_and_missing_rungs_have_their_own_markers(tmp_path):
    runs = frontier_runs({"sgd": ("HNMBBB", "HHHHHB")})
    path = write_frontier_dir(tmp_path / "run", runs, records=True)
    (section,) = frontier_sections(load_report_data([path]))
    names = {t["name"]: t for t in _traces(section) if t["mode"] == "markers"}
    assert names["did not learn"]["x"] == [1] and names["missing"]["x"] == [2]
    assert names["missing"]["marker"]["symbol"] == "circle-open"
    costs = next(t for t in _traces(section) if t["mode"] == "text")["text"]
    assert costs == ["cost unknown"]


def test_a_comparison_page_says_what_each_run_directory_found(frontier_dir, tmp_path):
    after = write_frontier_dir(
        tmp_path / "after",
        frontier_runs({"kfac:cholesky": ("HHHHHB", "HHHHHB")}),
        records=True,
    )
    sections = frontier_sections(load_report_data([frontier_dir, after]))
    damping = next(s for s in sections if s.key == "frontier-damping")
    found = re.findall(r"<b>Found:</b> (.*?)</p>", damping.html)
    assert found[0].startswith("In run, on the damping ladder")
    assert found[1] == (
        "In after, on the damping ladder (0.1 .. 1e-06, 6 rungs): on the mlp in bfloat16, "
        "kfac:cholesky breaks at 1e-06, as float32 does (cost 0)."
    )
    titles = [a["text"] for a in damping.figure["layout"]["annotations"]]
    assert titles == ["run · mlp · bf16", "after · mlp · bf16"]


def test_without_frontiers_the_page_says_so_first(tmp_path):
    from tests.precision_lab.synthetic_runs import make_run_dir

    run = make_run_dir(tmp_path / "plain", optimizers=("adamw",), broken=None)
    first = build_sections(load_report_data([run]))[0]
    assert first.key == "frontiers" and first.figure is None
    assert "no frontier" in first.empty


# -- per-step figures, one view at a time --------------------------------------------


def _views(spec: dict) -> dict[str, list[bool]]:
    (menu,) = spec["layout"]["updatemenus"]
    return {b["label"]: b["args"][0]["visible"] for b in menu["buttons"]}


@pytest.mark.parametrize("key", ["condition", "training"])
def test_per_step_figures_show_one_model_and_rung_at_a_time(frontier_dir, key):
    data = load_report_data([frontier_dir])
    spec = next(s.figure for s in build_sections(data) if s.key == key)
    views = _views(spec)
    traces = spec["data"]
    # one entry per (model, scenario) that has lines, in the suite's order (mildest first)
    labels = list(views)
    assert labels[:2] == ["mlp · damping=0.1", "mlp · damping=0.01"]
    assert "mlp · input_scale=65536" in labels
    for label, visible in views.items():
        assert len(visible) == len(traces)
        scenario = label.split(" · ")[1]
        shown = [t for t, v in zip(traces, visible, strict=True) if v]
        per_run = [t for t in shown if not t["name"].startswith("1/eps")]
        assert per_run and all(f"· {scenario}" in t["hovertemplate"] for t in per_run)
        hidden = [t for t, v in zip(traces, visible, strict=True) if not v]
        assert all(f"· {scenario}<" not in t["hovertemplate"] for t in hidden)
        # every view names each legend entry once
        names = [t["name"] for t in per_run if t["showlegend"]]
        assert len(names) == len(set(names)) == len({t["name"] for t in per_run})
    # on load, the first view is shown
    on_load = [t.get("visible", True) for t in traces]
    assert on_load == views[labels[0]]


def test_the_dtype_1_over_eps_levels_stay_in_every_view(frontier_dir):
    data = load_report_data([frontier_dir])
    spec = next(s.figure for s in build_sections(data) if s.key == "condition")
    levels = [i for i, t in enumerate(spec["data"]) if t["name"].startswith("1/eps")]
    assert {spec["data"][i]["name"] for i in levels} == {"1/eps bf16", "1/eps fp32"}
    for visible in _views(spec).values():
        assert all(visible[i] for i in levels)
