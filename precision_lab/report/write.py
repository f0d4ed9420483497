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
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from precision_lab.errors import UsageError
from precision_lab.report.figures import FIGURE_BUILDERS
from precision_lab.report.page import Section, render_page, sources_html
from precision_lab.report.scaling import scaling_section
from precision_lab.report.tables import environment_table, overview_table, sources_table

SUMMARY_FILE = "summary.json"
RECORDS_FILE = "records.parquet"
CONFIG_FILE = "config.json"


@dataclass
class RunSource:
    """One run directory as read for a report.

    Attributes:
        label: Short name shown on the page (the directory's name, made unique).
        path: The run directory.
        summary: One row per run of ``summary.json`` (DESIGN.md's fields).
        records: The long records table (`probes.records.COLUMNS`).
        config: ``config.json`` as a dict, or None where the directory has none.
    """

    label: str
    path: Path
    summary: pd.DataFrame
    records: pd.DataFrame
    config: dict | None


@dataclass
class ReportData:
    """Every source's runs and records, concatenated with a ``source`` column.

    ``key`` (``source/run``) identifies a run across sources, since two run
    directories of the same suite reuse the same run ids.
    """

    sources: list[RunSource]
    summary: pd.DataFrame = field(init=False)
    records: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        summaries, records = [], []
        for src in self.sources:
            s = src.summary.copy()
            s.insert(0, "source", src.label)
            summaries.append(s)
            r = src.records.copy()
            r.insert(0, "source", src.label)
            records.append(r)
        self.summary = pd.concat(summaries, ignore_index=True)
        self.records = pd.concat(records, ignore_index=True)
        for frame in (self.summary, self.records):
            frame["key"] = frame["source"] + "/" + frame["run"].astype(str)
        # Records repeat a few names many times: categories filter and group far faster
        # than Arrow-backed strings.
        for column in ("source", "run", "key", "probe", "module", "tensor", "metric", "dtype"):
            self.records[column] = self.records[column].astype("category")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}): "
            f"{what} must be rewritten by `precision-lab stress`."
        ) from err
    except OSError as err:
        raise UsageError(f"{path} cannot be read ({err.strerror}).") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, but {what} must be an object.")
    return data


def read_run_dir(path: str | Path, label: str | None = None) -> RunSource:
    """Read and check one run directory.

    Args:
        path: A directory written by ``precision-lab stress``.
        label: Name shown on the page; defaults to the directory's name.

    Raises:
        UsageError: In one sentence, if the directory or one of its files is missing or
            corrupt.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"Run directory {str(path)!r} does not exist: pass a directory written by "
            "`precision-lab stress` (it holds summary.json and records.parquet)."
        )
    # rundir writes reports with write_report, so it is imported here, not at the top.
    from precision_lab.run.directory import load_run

    try:
        frame, records = load_run(path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if len(frame) and "run" not in frame.columns:
        raise UsageError(
            f"{path / SUMMARY_FILE} has runs without a 'run' id, as the summary schema requires."
        )
    config_path = path / CONFIG_FILE
    config = _read_json(config_path, CONFIG_FILE) if config_path.is_file() else None
    frame["run"] = frame["run"].astype(str)
    return RunSource(label or path.resolve().name, path, frame, records, config)


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, with the parent's name prefixed where two names collide."""
    names = [p.resolve().name for p in paths]
    labels = []
    for p, name in zip(paths, names, strict=True):
        if names.count(name) > 1:
            name = f"{p.resolve().parent.name}/{name}"
        labels.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(labels):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            labels[i] = f"{name} ({seen[name]})"
    return labels


def load_report_data(run_dirs: Sequence[str | Path]) -> ReportData:
    """Read every run directory into one `ReportData` (sources in the order given)."""
    if not run_dirs:
        raise UsageError("No run directory given: pass at least one RUN_DIR.")
    paths = [Path(p) for p in run_dirs]
    labels = _unique_labels(paths)
    return ReportData([read_run_dir(p, lbl) for p, lbl in zip(paths, labels, strict=True)])


def _guarded(builder: Callable[[ReportData], Section], data: ReportData) -> Section:
    """One section, or, if its builder fails on unexpected data, a section that says so:
    the rest of the page (and the stress run that writes it) still comes out."""
    try:
        return builder(data)
    except Exception as err:  # a bug in one figure must not cost the whole report
        name = builder.__name__.replace("_", " ")
        message = f"This section ({name}) could not be built: {type(err).__name__}: {err}."
        warnings.warn(message, stacklevel=2)
        key = builder.__name__.replace("_", "-")
        return Section(key, name.capitalize(), "Not drawn: see below.", empty=message)


def build_sections(data: ReportData) -> list[Section]:
    """The page's sections in reading order: the run directories side by side (when
    comparing), the overview, the figures, the environment."""
    builders = [
        *([sources_table] if len(data.sources) > 1 else []),
        overview_table,
        *FIGURE_BUILDERS,
        scaling_section,
        environment_table,
    ]
    return [_guarded(builder, data) for builder in builders]


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
