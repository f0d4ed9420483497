"""One self-contained, offline HTML report for one or several run directories.

`write_report` reads run directories (``summary.json``, ``records.parquet``,
``config.json``; see DESIGN.md), builds every figure of `precision_lab.report.figures`
and writes a single HTML file: plotly.js is inlined exactly once, figures are embedded
as JSON and drawn by ``Plotly.newPlot``, nothing is fetched from the network. Several
run directories become one comparison page: every run keeps the label of the directory
it came from (its ``source``), and figures draw the sources side by side.

Long traces are thinned for display only (`precision_lab.report.figures.Thinning`);
the page says under each figure where that happened, and ``records.parquet`` stays
whole.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from precision_lab.errors import UsageError
from precision_lab.report.data import ReportData, load_report_data
from precision_lab.report.figures import FIGURE_BUILDERS
from precision_lab.report.frontiers import frontier_sections
from precision_lab.report.headroom import headroom_heatmap
from precision_lab.report.page import Section, render_page, sources_html
from precision_lab.report.scaling import scaling_section
from precision_lab.report.tables import (
    environment_table,
    overview_table,
    precision_events_table,
    sources_table,
)
from precision_lab.report.whatif import whatif_table


def _guarded(
    builder: Callable[[ReportData], Section | list[Section]], data: ReportData
) -> list[Section]:
    """A builder's section (or sections), or, if it fails on unexpected data, a section
    that says so: the rest of the page (and the stress run that writes it) still comes out."""
    try:
        made = builder(data)
        return made if isinstance(made, list) else [made]
    except Exception as err:  # a bug in one figure must not cost the whole report
        name = builder.__name__.replace("_", " ")
        message = f"This section ({name}) could not be built: {type(err).__name__}: {err}."
        warnings.warn(message, stacklevel=2)
        key = builder.__name__.replace("_", "-")
        return [Section(key, name.capitalize(), "Not drawn: see below.", empty=message)]


def build_sections(data: ReportData) -> list[Section]:
    """The page's sections in reading order: the frontiers (one per knob, each with what
    the suite found), the run directories side by side (when comparing), the overview,
    the figures, the distance to failure, the precision escalations and the what-if
    dtypes, the environment."""
    builders = [
        frontier_sections,
        *([sources_table] if len(data.sources) > 1 else []),
        overview_table,
        *FIGURE_BUILDERS,
        headroom_heatmap,
        precision_events_table,
        whatif_table,
        scaling_section,
        environment_table,
    ]
    return [section for builder in builders for section in _guarded(builder, data)]


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path, *, title: str | None = None
) -> Path:
    """Write the HTML report of one run directory, or a comparison of several.

    Args:
        run_dirs: Run directories written by ``precision-lab stress``; with more than
            one, the page compares them side by side.
        out: The HTML file to write (its parent directory is created).
        title: Page title; defaults to the sources' labels.

    Returns:
        The path written.

    Raises:
        UsageError: If a run directory is missing or corrupt, or ``out`` cannot be
            written (one sentence).
    """
    data = load_report_data(run_dirs)
    sections = build_sections(data)
    labels = [s.label for s in data.sources]
    page_title = title or "precision-lab report: " + " vs ".join(labels)
    html = render_page(page_title, sections, sources_html(data))
    out = Path(out)
    # Written under a name of this process's own, then renamed: a kill or a full disk
    # leaves the previous report or none, never half of one.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        raise UsageError(f"Cannot write the report to {str(out)!r} ({err.strerror}).") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out
