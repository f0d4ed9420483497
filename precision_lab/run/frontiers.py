"""Breaking-point frontiers: where along a knob's ladder each optimizer breaks, in a
low-precision dtype and in float32, and how many rungs the dtype costs.

A frontier rung is an ordinary run whose ``frontier`` names the knob and ``knob_value``
its value; its float32 control names it in ``control_of``. `frontier_entries` groups the
rungs of one (model, knob, optimizer, dtype, mode, seed), orders them from the mildest
to the harshest (`precision_lab.workloads.knobs.Knob.mildest_first`) and reads off:

- each rung's status, and its control's: ``broke`` (`precision_lab.run.summary.broke`),
  ``no_learning`` (did not break, ``learned`` false), ``held`` (did not break; learned or
  unknown) or ``missing`` (absent, or never finished: skipped, interrupted);
- the breaking point: the mildest rung that broke, null when none did;
- the precision cost: (index of the control's breaking point, or the ladder's length) -
  (index of the run's, or the ladder's length), in rungs; null when a rung it depends on
  (one milder than or at either breaking point, or any when neither broke) is missing;
- ``cost_lower_bound``: the true cost may be larger than the ladder shows, because the
  control held everywhere (its breaking point lies beyond the harshest rung) or the run
  broke already at the mildest rung (its breaking point lies before the ladder), while
  the run broke earlier than its control;
- ``monotone``: false when the run broke at a rung but did not break at a harsher one;
- ``verdict``: the cost in plain words, with ``non-monotone`` flagged and a note where
  the run broke at a rung whose control held without learning (that rung says little
  about the dtype: `precision_lab.run.summary.failure_cause` charges it to no_learning).

The fields are pinned by the frontier schema (summary.json's ``frontiers``, docs/suites.md).
"""

from __future__ import annotations

import statistics
from typing import Any

from precision_lab.run.summary import broke
from precision_lab.workloads.knobs import get_knob

ENTRY_KEY = ("model", "knob", "optimizer", "dtype", "mode", "seed")
"""What identifies one entry of summary.json's ``frontiers``."""

STATUSES = ("held", "broke", "no_learning", "missing")


def rung_status(run: dict[str, Any] | None) -> str:
    """``held``, ``broke``, ``no_learning`` or ``missing`` (module docstring)."""
    if run is None:
        return "missing"
    state = broke(run)
    if state is None:
        return "missing"
    if state:
        return "broke"
    return "no_learning" if run.get("learned") is False else "held"


def _breaking_index(statuses: list[str]) -> tuple[int | None, bool]:
    """Index of the mildest ``broke`` (None: none broke) and whether that index is known:
    no rung before it (or, when none broke, no rung at all) is missing."""
    for i, status in enumerate(statuses):
        if status == "broke":
            return i, "missing" not in statuses[:i]
    return None, "missing" not in statuses


def _monotone(statuses: list[str]) -> bool:
    seen_broke = False
    for status in statuses:
        if status == "broke":
            seen_broke = True
        elif seen_broke and status in ("held", "no_learning"):
            return False
    return True


def _plural(n: int) -> str:
    return f"{n} rung" if n == 1 else f"{n} rungs"


def _verdict(
    run_index: int | None,
    control_index: int | None,
    cost: int | None,
    lower_bound: bool,
    missing: int,
    monotone: bool,
) -> str:
    if cost is None:
        text = f"unknown ({_plural(missing)} missing)"
    elif run_index is None and control_index is None:
        text = "held everywhere"
    elif run_index == 0 and control_index == 0:
        text = "broke everywhere"
    elif cost > 0:
        text = f"costs {'at least ' if lower_bound else ''}{_plural(cost)}"
    elif cost == 0:
        text = "costs nothing"
    else:
        text = f"breaks later than float32 ({cost} rungs)"
    return text if monotone else f"{text}; non-monotone"


def _entry(
    key: tuple, ladder: list[float], rungs: dict[float, dict], controls: dict[str, dict]
) -> dict[str, Any]:
    rows = []
    for value in ladder:
        run = rungs.get(value)
        control = None if run is None else controls.get(run["run"])
        rows.append(
            {
                "knob_value": value,
                "run": None if run is None else run["run"],
                "control": None if control is None else control["run"],
                "status": rung_status(run),
                "control_status": rung_status(control),
            }
        )
    statuses = [r["status"] for r in rows]
    control_statuses = [r["control_status"] for r in rows]
    run_index, run_known = _breaking_index(statuses)
    control_index, control_known = _breaking_index(control_statuses)
    n = len(ladder)
    cost = (
        (n if control_index is None else control_index) - (n if run_index is None else run_index)
        if run_known and control_known
        else None
    )
    lower_bound = bool(cost is not None and cost > 0 and (control_index is None or run_index == 0))
    monotone = _monotone(statuses)
    verdict = _verdict(
        run_index,
        control_index,
        cost,
        lower_bound,
        sum("missing" in pair for pair in zip(statuses, control_statuses, strict=True)),
        monotone and _monotone(control_statuses),
    )
    if run_index is not None and control_statuses[run_index] == "no_learning":
        # The schema's breaking points count only runs that broke; say where the
        # comparison is weak (failure_cause charges such a run to no_learning).
        verdict += f"; float32 did not learn at {format(ladder[run_index], 'g')}"
    return {
        **dict(zip(ENTRY_KEY, key, strict=True)),
        "ladder": ladder,
        "rungs": rows,
        "breaking_point": None if run_index is None else ladder[run_index],
        "control_breaking_point": None if control_index is None else ladder[control_index],
        "precision_cost": cost,
        "cost_lower_bound": lower_bound,
        "monotone": monotone,
        "control_monotone": _monotone(control_statuses),
        "verdict": verdict,
    }


def frontier_entries(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json's ``frontiers``: one entry per (model, knob, optimizer, dtype, mode,
    seed) of the low-precision frontier rungs in ``runs`` (float32 runs are controls).

    A pure function of the run objects (summary.json's ``runs``), so a reader can recompute
    it. The ladder of an entry is every value of the knob among its runs, mildest first
    (summary.json lists every planned run from the start: one that never finished counts
    as missing).
    """
    controls = {r["control_of"]: r for r in runs if r.get("control_of") and r.get("frontier")}
    groups: dict[tuple, dict[float, dict]] = {}
    for run in runs:
        if not run.get("frontier") or run.get("control_of") or run.get("dtype") == "float32":
            continue
        key = tuple(run[k] if k != "knob" else run["frontier"] for k in ENTRY_KEY)
        groups.setdefault(key, {})[float(run["knob_value"])] = run
    entries = []
    for key, rungs in groups.items():
        ladder = get_knob(key[1]).mildest_first(list(rungs))
        entries.append(_entry(key, ladder, rungs, controls))
    return entries


def median_cost(entries: list[dict[str, Any]]) -> dict[tuple, float | None]:
    """Per (model, knob, optimizer, dtype, mode): the median of ``precision_cost`` over the
    seeds, None when any seed's cost is unknown."""
    costs: dict[tuple, list[int | None]] = {}
    for entry in entries:
        costs.setdefault(tuple(entry[k] for k in ENTRY_KEY[:-1]), []).append(
            entry["precision_cost"]
        )
    return {
        key: None if any(c is None for c in values) else statistics.median(values)
        for key, values in costs.items()
    }
