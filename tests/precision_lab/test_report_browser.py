"""Reports opened in a real headless chromium: every figure draws, no script errors, the
comparison page holds both runs, a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import re

import pytest

from precision_lab.report import write_report
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
    table = re.search(r'<table class="data sortable".*?</table>', loaded.dom, re.S).group(0)
    assert table.count("<td>bf16-run</td>") == 12 and table.count("<td>fp16-run</td>") == 12
    # the drawn heatmap's axis labels carry both sources
    heatmap = re.search(r'id="fig-stability".*?</svg>', loaded.dom, re.S).group(0)
    assert "bf16-run · large-lr · bf16" in heatmap and "fp16-run · large-lr · fp16" in heatmap


def test_a_script_error_would_be_caught(tmp_path):
    """The check above can fail: a page with a broken script shows up in both channels."""
    page = tmp_path / "broken.html"
    html = write_report_html_with_error(tmp_path)
    page.write_text(html)
    run = browser.load(page)
    assert any("not defined" in e for e in run.errors)
    assert "Script error" in run.dom


def write_report_html_with_error(tmp_path) -> str:
    run = make_run_dir(tmp_path / "run", optimizers=("adamw",), steps=5, broken=None)
    html = write_report([run], tmp_path / "ok.html").read_text()
    return html.replace("</body>", "<script>notAFunction();</script></body>")


def test_screenshot_is_kept_for_review(comparison_page):
    png = browser.screenshot(comparison_page, browser.artifacts_dir() / "report-comparison.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 100_000  # a blank page of this size is far smaller
