"""The numerics probe: statistics of every watched tensor at the probe's cadence.

In a full numerics iteration the session hands each watched tensor to `measure`
(activations, output gradients, gradients, weights before the step, factors, momenta,
updates); `record` writes their `probes.stats` rows at the iteration's end and keeps the
largest ``underflow_fraction`` for the summary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probes.flags import Label, local_shard, watchable
from probes.limits import dtype_name
from probes.records import Recorder
from probes.stats import STAT_METRICS, STAT_UNITS, tensor_stats

_UNDERFLOW = STAT_METRICS.index("underflow_fraction")


class NumericsProbe:
    """Measures tensors during an iteration and records their statistics at its end."""

    def __init__(self, recorder: Recorder, run_dtype: torch.dtype) -> None:
        """Rows go to ``recorder``; cast metrics refer to ``run_dtype``."""
        self.recorder = recorder
        self.run_dtype = run_dtype
        self._stats: list[tuple[Label, str, list[float]]] = []
        self.max_underflow: float | None = None

    def measure(self, label: Label, tensor: Tensor) -> None:
        """Take the statistics of ``tensor`` (a reading, kept until `record`)."""
        tensor = local_shard(tensor)
        if not watchable(tensor):
            return
        self._stats.append((label, dtype_name(tensor.dtype), tensor_stats(tensor, self.run_dtype)))

    def clear(self) -> None:
        """Drop the readings of an iteration (a new one begins)."""
        self._stats.clear()

    def record(self, step: int) -> None:
        """Write the iteration's readings as rows of step ``step``."""
        for (module, tensor, phase), dt, row in self._stats:
            underflow = row[_UNDERFLOW]
            if not math.isnan(underflow):
                self.max_underflow = (
                    underflow if self.max_underflow is None else max(self.max_underflow, underflow)
                )
            for metric, value in zip(STAT_METRICS, row, strict=True):
                self.recorder.add(
                    step,
                    "numerics",
                    metric,
                    value,
                    module=module,
                    tensor=tensor,
                    phase=phase,
                    dtype=dt,
                    unit=STAT_UNITS[metric],
                )
