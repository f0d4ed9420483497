"""Ctrl-C and SIGTERM during a stress suite: stop, save what was recorded, never die mid-write.

A suite is stopped by the first SIGINT (Ctrl-C) or SIGTERM (a scheduler preempting the
job): the run in progress stops at its next step and is recorded as unfinished, the
summary and the records are saved, the report is written, and the command exits 130
(SIGINT) or 143 (SIGTERM). A signal that arrives while a run's records are being saved
waits until they are (`StopSignals.protected`). Every later signal only hurries: it
skips the report (which can be rebuilt with ``precision-lab report RUN_DIR``) but never
interrupts saving the records, and never kills the process by the signal.

SIGKILL cannot be handled; the run directory survives it by writing every file
atomically (`precision_lab.run.directory`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from precision_lab.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ReportSkipped(BaseException):
    """Raised in the report's writer by a signal that arrives while it writes.

    A BaseException, like KeyboardInterrupt, so that the report's guards against a
    failing figure (``except Exception``) do not swallow it.
    """


class StopSignals:
    """SIGINT and SIGTERM handlers for one suite; see the module docstring.

    Args:
        install: Install the handlers (the previous ones come back on `restore`). False
            leaves signals alone (rank 0 under torchrun handles SIGTERM its own way):
            `protected` and `writing_report` then do nothing.
    """

    def __init__(self, install: bool = True) -> None:
        self.received: list[int] = []
        self.closing = False
        self._depth = 0
        self._pending = False
        self._writing_report = False
        self._hurried = False
        self._previous = (
            {s: signal.signal(s, self._handle) for s in STOP_SIGNALS} if install else {}
        )

    def restore(self) -> None:
        """Put the handlers found at construction back, unless a signal came: then the
        command is on its way out, and one more Ctrl-C during the interpreter's shutdown
        must not kill it by the signal (Python re-raises an uncaught SIGINT), so later
        signals are ignored until the process ends."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received else handler)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        """130 when Ctrl-C stopped the suite, 143 for SIGTERM (DESIGN.md's codes)."""
        return EXIT_TERMINATED if self.received[:1] == [signal.SIGTERM] else EXIT_INTERRUPTED

    @property
    def skip_report(self) -> bool:
        """A second signal, or one that came while saving, asks to leave without the report."""
        return self._hurried

    @contextmanager
    def protected(self) -> Iterator[None]:
        """Hold the first signal until the block ends: a file being saved is finished."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @contextmanager
    def writing_report(self) -> Iterator[None]:
        """Inside the block a signal raises `ReportSkipped`, so the report is abandoned."""
        self._writing_report = True
        try:
            yield
        finally:
            self._writing_report = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._writing_report or self.closing or len(self.received) > 1:
            self._hurried = True
            # os.write: a print from a handler can collide with the print it interrupted.
            os.write(
                2,
                b"\nInterrupted while saving: the runs recorded so far are saved first; the "
                b"report is skipped.\n",
            )
            if self._writing_report:
                raise ReportSkipped
            return
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt
