"""The report's data: run directories read through `precision_lab.run.directory.read_run`,
one `RunSource` each, joined into one `ReportData` that every figure and table reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from precision_lab.errors import UsageError
from precision_lab.run.directory import read_run


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


def read_source(path: str | Path, label: str | None = None) -> RunSource:
    """One run directory, read and checked by `precision_lab.run.directory.read_run`.

    Args:
        path: A directory written by ``precision-lab stress``.
        label: Name shown on the page; defaults to the directory's name.

    Raises:
        UsageError: In one sentence, if the directory or one of its files is missing or
            corrupt.
    """
    run = read_run(path)
    summary = run.summary
    summary["run"] = summary["run"].astype(str)
    return RunSource(label or run.path.resolve().name, run.path, summary, run.records, run.config)


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
    return ReportData([read_source(p, lbl) for p, lbl in zip(paths, labels, strict=True)])
