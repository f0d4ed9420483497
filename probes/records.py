"""The one long table every probe writes: schema, an append-only recorder, Parquet I/O."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

COLUMNS = (
    "run",
    "step",
    "rank",
    "probe",
    "module",
    "tensor",
    "phase",
    "dtype",
    "metric",
    "value",
    "unit",
)

ARROW_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("step", pa.int64()),
        ("rank", pa.int32()),
        ("probe", pa.string()),
        ("module", pa.string()),
        ("tensor", pa.string()),
        ("phase", pa.string()),
        ("dtype", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
    ],
    metadata={b"precision_lab.schema": str(SCHEMA_VERSION).encode()},
)

PHASES = ("forward", "backward", "step", "")


class Recorder:
    """Collects rows in memory as plain tuples (cheap to append on the hot path).

    Args:
        run: The run id written into every row.
        rank: The process rank written into every row.
    """

    def __init__(self, run: str = "", rank: int = 0) -> None:
        self.run = run
        self.rank = rank
        self._rows: list[tuple] = []

    def add(
        self,
        step: int,
        probe: str,
        metric: str,
        value: float,
        *,
        module: str = "",
        tensor: str = "",
        phase: str = "",
        dtype: str = "",
        unit: str = "",
    ) -> None:
        """Append one row; ``value`` is stored as a float, never rounded."""
        self._rows.append(
            (
                self.run,
                int(step),
                self.rank,
                probe,
                module,
                tensor,
                phase,
                dtype,
                metric,
                float(value),
                unit,
            )
        )

    def add_many(self, step: int, probe: str, tensor: str, unit: str, metrics: tuple) -> None:
        """Append one row per ``(metric, value)`` of ``metrics``, sharing the other fields
        (module, phase and dtype empty): the per-step time rows, without keyword calls."""
        run, rank, step = self.run, self.rank, int(step)
        self._rows.extend(
            (run, step, rank, probe, "", tensor, "", "", metric, float(value), unit)
            for metric, value in metrics
        )

    def extend(self, rows: list[tuple]) -> None:
        """Append rows that are already full tuples in `COLUMNS` order."""
        self._rows.extend(rows)

    @property
    def rows(self) -> list[tuple]:
        return self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def to_frame(self) -> pd.DataFrame:
        return frame_from_rows(self._rows)


def frame_from_rows(rows: list[tuple]) -> pd.DataFrame:
    """Build the records DataFrame with the schema's column types."""
    table = pa.Table.from_pylist([dict(zip(COLUMNS, r, strict=True)) for r in rows], ARROW_SCHEMA)
    return table.to_pandas()


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write records to Parquet with the schema version in the file's metadata."""
    table = pa.Table.from_pandas(frame[list(COLUMNS)], schema=ARROW_SCHEMA, preserve_index=False)
    pq.write_table(table, str(path))


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read records written by `write_parquet`, refusing files of another schema.

    Raises:
        ValueError: If the file is not a precision-lab records file of this schema.
    """
    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"{path} is not a readable Parquet file ({err}).") from err
    meta = table.schema.metadata or {}
    version = meta.get(b"precision_lab.schema")
    if version is None or int(version) != SCHEMA_VERSION:
        raise ValueError(
            f"{path} is not a precision-lab records file of schema {SCHEMA_VERSION} "
            f"(found schema {version!r})."
        )
    return table.to_pandas()


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN or Inf: non-finite numbers are written as null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
