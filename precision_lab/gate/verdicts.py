"""A gate's verdicts: what one check concluded on one run, configuration or frontier, and
the statuses it may conclude (`precision_lab.gate.checks` and `precision_lab.gate.frontiers`
both make them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAIL, BETTER, OK, NEW, SKIP = "fail", "better", "ok", "new", "skip"
# Failures first, then what a reviewer should notice, then the unremarkable.
STATUS_ORDER = {FAIL: 0, BETTER: 1, NEW: 2, OK: 3, SKIP: 4}


@dataclass(frozen=True)
class Verdict:
    """One check on one run (or one configuration): what was compared and concluded.

    Attributes:
        check: ``category.figure``.
        run: the run's key label (``seed*`` for a configuration); ``key`` the key itself.
        status: ``fail``, ``better``, ``ok``, ``new`` (no baseline) or ``skip``.
        baseline, current: the figure's values (null where non-finite or absent); for
            ``stability.seeds_broken``, ``"broken/seeds"``.
        change: the change, as the check measures it (relative, factor or absolute).
        message: for a failure, the run and the figure and by how much; else a note.
        p_value: for ``stability.seeds_broken``, the one-sided Fisher exact test's; for a
            frontier judged over seeds, the one-sided permutation test's.
    """

    check: str
    run: str
    key: dict[str, Any] | None
    status: str
    baseline: Any = None
    current: Any = None
    change: str = ""
    message: str = ""
    p_value: float | None = None
