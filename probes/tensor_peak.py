"""Peak live tensor bytes of one block of CPU work, from the allocator's own events.

A process's resident set says little about what an optimizer costs on the CPU: the torch
runtime alone holds about 600 MB, and freed pages stay with the process. The PyTorch
profiler, asked for memory (``profile_memory=True``), records every allocation and free
of the CPU allocator with its size; summed in time order they give the live bytes at
each moment, and their maximum is the block's peak above what was live when it began.
This is exact for tensors (no sampling), and costs the profiler's start and stop (a few
milliseconds once warm; the first start in a process takes about a second).

The profiler of some torch builds prints a line to the process's stderr at each start and
stop (``USDT: ... profiler_start``), and warns there about each block freed that was
allocated before it started; `TensorPeak` sends file descriptor 2 to /dev/null while it
profiles, so the lines do not land over a progress bar.

On CUDA the allocator keeps its own peak (`probes.device_memory`): use that there.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile, record_function


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (what C++ code prints there is lost)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TensorPeak:
    """Measures the peak of live CPU tensor bytes between `mark` (or the start) and the end.

    Use as a context manager, or with `start` and `stop`. Blocks freed while profiling that
    were allocated before it started are invisible to the profiler (which warns about each
    on stderr: silenced here), so a block that frees state made before it would be counted
    too high. Profile from one step earlier and `mark` the step to measure: the state it
    frees was then allocated inside the profile, and the measured step's figure is exact.

    Attributes:
        peak_bytes: After `stop`, the largest amount of tensor bytes allocated after the
            mark and not yet freed at any moment (0 if never more than freed); None before
            `stop`, and when the block raised.
    """

    MARK = "probes.tensor_peak.mark"

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._quiet = contextlib.ExitStack()
        self._marked = False

    def start(self) -> None:
        """Start profiling; until `stop`, what C++ code prints on stderr is dropped (the
        profiler's warnings about blocks allocated before it started)."""
        self._quiet.enter_context(_quiet_stderr())
        self._profile.start()

    def mark(self) -> None:
        """Measure from here: allocations and frees before the mark do not count."""
        with record_function(self.MARK):
            pass
        self._marked = True

    def stop(self, *, measure: bool = True) -> None:
        """Stop profiling; with ``measure``, set `peak_bytes`."""
        try:
            self._profile.stop()
        finally:
            self._quiet.close()
        if not measure:
            return
        events = self._profile.events()
        begin = min(
            (e.time_range.start for e in events if e.name == self.MARK),
            default=None if self._marked else float("-inf"),
        )
        if begin is None:
            return
        self.peak_bytes = peak_of(
            (e.time_range.start, e.self_cpu_memory_usage)
            for e in events
            if e.self_cpu_memory_usage != 0 and e.time_range.start >= begin
        )

    def __enter__(self) -> TensorPeak:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(measure=exc_type is None)


def peak_of(changes) -> int:
    """The largest running sum of ``(time, bytes)`` changes taken in time order, at least 0
    (allocations positive, frees negative)."""
    live = peak = 0
    for _, change in sorted(changes, key=lambda item: item[0]):
        live += change
        peak = max(peak, live)
    return peak
