"""The time probe: how long an iteration takes, and the probes' share of it (ms).

Per iteration: ``step_time_ms`` from the iteration's first forward to the end of its
step, the optimizer step's share ``optimizer_time_ms`` and the time spent in the
session's hooks ``probe_time_ms``; wall clock, ms. Every iteration counts towards the
summary's median step time and probe overhead; rows are written at the probe's cadence.
"""

from __future__ import annotations

import statistics

from probes.records import Recorder, finite_or_none


class TimeProbe:
    """Records iteration times at cadence ``every`` (None: never) and keeps the totals."""

    def __init__(self, recorder: Recorder, every: int | None) -> None:
        """Write rows to ``recorder`` on steps with ``step % every == 0``."""
        self.recorder = recorder
        self.every = every
        self._step_ms: list[float] = []
        self._total_step_ms = 0.0
        self._total_probe_ms = 0.0

    def record(self, step: int, step_ms: float, optimizer_ms: float, probe_ms: float) -> None:
        """Count one iteration's times (ms) and write them if the cadence is due."""
        self._step_ms.append(step_ms)
        self._total_step_ms += step_ms
        self._total_probe_ms += probe_ms
        if self.every and step % self.every == 0:
            self.recorder.add_many(
                step,
                "time",
                "step",
                "ms",
                (
                    ("step_time_ms", step_ms),
                    ("optimizer_time_ms", optimizer_ms),
                    ("probe_time_ms", probe_ms),
                ),
            )

    def median_step_ms(self) -> float | None:
        """Median iteration time (ms); None before the first iteration or if not finite."""
        return finite_or_none(statistics.median(self._step_ms)) if self._step_ms else None

    def overhead_fraction(self) -> float | None:
        """Time in the probes over iteration time (fraction), None without time."""
        if self._total_step_ms > 0:
            return finite_or_none(self._total_probe_ms / self._total_step_ms)
        return None
