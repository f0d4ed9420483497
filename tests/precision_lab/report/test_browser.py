"""Reports opened in a real headless chromium: every figure draws, no script errors, the
comparison page holds both runs, a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import html
import re

import pytest

from precision_lab.report.data import load_report_data
from precision_lab.report.frontiers import frontier_sections
from precision_lab.report.write import write_report
from tests.precision_lab import browser
from tests.precision_lab.synthetic_runs import make_run_dir

pytestmark = [pytest.mark.browser, browser.requires_chromium]


@pytest.fixture(scope="module")
def comparison_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    bf16 = make_run_dir(root / "bf16-run")
    fp16 = make_run_dir(
        root / "fp16-run",
        dtypes=("float32", "float16"),
        broken=("singd:diagonal", "float16", "large-lr"),
        break_step=7,
        seed=1,
    )
    return write_report([bf16, fp16], root / "compare.html")


@pytest.fixture(scope="module")
def loaded(comparison_page):
    return browser.load(comparison_page)


def _figure_divs(dom: str) -> list[str]:
    """Each figure's container, from its opening tag to the next section."""
    return re.findall(
        r'<div id="fig-[^"]+" class="figure[^"]*".*?(?=<script type="application/json")', dom, re.S
    )


def test_every_figure_is_drawn(loaded, comparison_page):
    specs = comparison_page.read_text().count('class="figure-spec"')
    assert specs >= 9
    rendered = re.search(r'data-figures-rendered="(\d+)"', loaded.dom)
    assert rendered is not None, "the page's render loop did not finish"
    assert int(rendered.group(1)) == specs
    divs = _figure_divs(loaded.dom)
    assert len(divs) == specs
    for div in divs:
        # Plotly marks a drawn figure js-plotly-plot and puts its drawing in main-svg.
        assert "js-plotly-plot" in div and 'class="main-svg"' in div, div[:200]


def test_no_script_errors(loaded):
    assert loaded.errors == [], loaded.errors
    banner = re.search(r'<div id="page-errors"[^>]*>', loaded.dom).group(0)
    assert "hidden" in banner


def test_comparison_page_shows_both_runs(loaded):
    assert "bf16-run" in loaded.dom and "fp16-run" in loaded.dom
    table = re.search(
        r'<table class="data sortable" id="overview-table".*?</table>', loaded.dom, re.S
    ).group(0)
    assert table.count("<td>bf16-run</td>") == 12 and table.count("<td>fp16-run</td>") == 12
    # the drawn heatmap's axis labels carry both sources
    heatmap = re.search(r'id="fig-stability".*?</svg>', loaded.dom, re.S).group(0)
    assert "bf16-run · large-lr · bf16" in heatmap and "fp16-run · large-lr · fp16" in heatmap


def test_a_script_error_would_be_caught(comparison_page, tmp_path):
    """The check above can fail: a broken script shows in the console and the banner."""
    page = tmp_path / "broken.html"
    html = comparison_page.read_text()
    page.write_text(html.replace("</body>", "<script>notAFunction();</script></body>"))
    run = browser.load(page)
    assert any("not defined" in e for e in run.errors)
    assert "Script error" in run.dom


def test_screenshot_is_kept_for_review(comparison_page):
    png = browser.screenshot(comparison_page, browser.artifacts_dir() / "report-comparison.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 100_000  # a blank page of this size is far smaller


def test_overview_sorts_on_a_header_click(comparison_page, tmp_path):
    """Clicking "first NaN/Inf step" twice sorts descending: the two broken runs (steps 23
    and 7) come first, the runs without a value last."""
    click = (
        "<script>var th=Array.from(document.querySelectorAll('#overview-table th'))"
        ".find(function(h){return h.textContent==='first NaN/Inf step';});"
        "th.click();th.click();</script>"
    )
    page = tmp_path / "sorted.html"
    page.write_text(comparison_page.read_text().replace("</body>", click + "</body>"))
    run = browser.load(page)
    assert run.errors == []
    table = re.search(r'id="overview-table".*?</table>', run.dom, re.S).group(0)
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.S).group(1)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    column = re.findall(r"<th[^>]*>(.*?)</th>", table).index("first NaN/Inf step")
    values = [re.findall(r"<td[^>]*>(.*?)</td>", r)[column] for r in rows]
    assert values[:2] == ["23", "7"] and set(values[2:]) == {"–"}
    assert 'data-dir="desc"' in run.dom


def test_the_quick_suites_report_opens_with_its_frontiers(quick_run):
    """The report ``precision-lab stress --suite quick`` wrote (real training, real
    frontiers), opened in chromium: it opens with a drawn frontier figure per knob, each
    under the sentence saying what the suite found, with no script error."""
    page = quick_run / "report.html"
    loaded = browser.load(page)
    assert loaded.errors == [], loaded.errors
    sections = re.findall(r'<section id="([^"]+)"', loaded.dom)
    knobs = [key for key in sections if key.startswith("frontier-")]
    assert knobs and sections[: len(knobs)] == knobs, sections
    expected = [
        html.unescape(sentence)
        for section in frontier_sections(load_report_data([quick_run]))
        for sentence in re.findall(r"<b>Found:</b> (.*?)</p>", section.html)
    ]
    found = [html.unescape(s) for s in re.findall(r"<b>Found:</b> (.*?)</p>", loaded.dom)]
    assert found == expected and len(found) == len(knobs)
    for key, sentence in zip(knobs, found, strict=True):
        knob = key.removeprefix("frontier-").replace("-", "_")
        assert sentence.startswith(f"On the {knob} ladder (")
        drawn = re.search(rf'<div id="fig-{key}" class="figure[^"]*".*?</svg>', loaded.dom, re.S)
        assert drawn and "js-plotly-plot" in drawn.group(0) and 'class="main-svg"' in drawn.group(0)
        # the rows name the float32 controls, the legend the statuses
        figure = re.search(
            rf'<div id="fig-{key}".*?(?=<script type="application/json")', loaded.dom, re.S
        )
        assert "fp32 control" in figure.group(0) and ">held<" in figure.group(0)
    png = browser.screenshot(
        page, browser.artifacts_dir() / "report-quick-frontiers.png", (1400, 2000)
    )
    assert png.stat().st_size > 50_000
