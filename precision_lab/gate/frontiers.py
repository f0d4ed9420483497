"""The gate's frontier checks: did a breaking point move milder along its ladder?

A frontier (DESIGN.md, ``precision_lab.run.frontiers``) sweeps a knob from mild to harsh; its
breaking point is the mildest rung whose run broke. Here a breaking point is compared by its
**position** on the ladder: the index of the mildest rung that broke, or ``len(ladder)``
where every rung held (held everywhere is the harshest position there is). Two checks, each
per frontier (model, knob, optimizer, dtype, mode, seed):

- ``frontier.breaking_point``: the low-precision dtype's runs;
- ``frontier.control_breaking_point``: their float32 controls (a change that makes the
  optimizer itself break earlier, whatever the dtype).

**One seed per configuration**: a position milder (smaller) than the baseline's fails, a
harsher one is reported ``better``. **Several seeds**: the seeds' positions are judged
together by an exact one-sided permutation test on the sum of the positions: of all the
ways of splitting the pooled positions of both runs into ``n_current`` and ``n_baseline``
seeds, the share whose current part sums to at most the observed sum is the p-value; it
fails below ``alpha`` (``better`` when the other tail is below ``alpha``). On a ladder of
one rung, positions are 0 (broke) and 1 (held) and the test is exactly the one-sided Fisher
test of ``stability.seeds_broken`` (`fisher_exact_greater`); with five seeds against five,
every seed breaking milder than every baseline seed gives p = 1/252 = 0.004. The table
shows each side's median position (the milder middle for an even number of seeds) and the
seeds' breaking points. The test counts splits with integers: its p-value is exact.

**Rounding noise.** A position is a function of whether each rung's run broke, which no
thread count or CPU has been seen to move (``precision_lab.gate.checks``); the permutation
test is exact integer arithmetic. The verdict does not depend on the thread count.

**Unknown positions.** A rung whose run did not finish or is absent (``missing``) milder than
the first broken rung leaves the position unknown: such a frontier is skipped, with the
reason; the missing run itself fails ``coverage.run``. A frontier of the baseline absent from
the run directory fails ``coverage.frontier``; a new one is reported ``new``. A frontier
with a rung its baseline's ladder lacks cannot be compared (a `UsageError`, exit 2); one that
lacks a rung of the baseline's (its run removed from the summary) has that rung ``missing``.

`judge_frontiers` makes every frontier verdict for ``precision_lab.gate.checks.gate``.
Baselines store each frontier's ladder and its rungs' statuses (`frontier_document`), and
are checked on read (`read_frontier`): statuses from the known set, one per rung, and the
stored breaking points equal to the ones the statuses give.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from precision_lab.errors import UsageError
from precision_lab.gate.verdicts import BETTER, FAIL, NEW, OK, SKIP, Verdict
from precision_lab.run.frontiers import ENTRY_KEY, STATUSES

if TYPE_CHECKING:
    from precision_lab.gate.baseline import RunSet

FRONTIER_KEY_FIELDS = ENTRY_KEY
"""A frontier's key: summary.json's ``frontiers`` entries' (`precision_lab.run.frontiers`)."""
SIDES = {"breaking_point": "statuses", "control_breaking_point": "control_statuses"}
"""The two checks, each with the rung statuses it reads."""


@dataclass(frozen=True, order=True)
class FrontierKey:
    """What identifies a frontier across run directories (`FRONTIER_KEY_FIELDS`)."""

    model: str
    knob: str
    optimizer: str
    dtype: str
    mode: str
    seed: int

    @property
    def label(self) -> str:
        """``mlp/damping/kfac:cholesky/bfloat16/pure/seed0``."""
        return "/".join((*self.config, f"seed{self.seed}"))

    @property
    def config(self) -> tuple[str, ...]:
        """Every coordinate but the seed: what the seeds of one configuration share."""
        return (self.model, self.knob, self.optimizer, self.dtype, self.mode)

    @property
    def config_label(self) -> str:
        """``mlp/damping/kfac:cholesky/bfloat16/pure/seed*``."""
        return "/".join((*self.config, "seed*"))

    def as_dict(self) -> dict[str, Any]:
        """The key as a JSON object."""
        return {name: getattr(self, name) for name in FRONTIER_KEY_FIELDS}


def rung_label(value: float) -> str:
    """A knob value as run ids write it (``format(value, "g")``)."""
    return format(value, "g")


@dataclass(frozen=True)
class Frontier:
    """One frontier: its ladder and what each rung's run and float32 control did.

    Attributes:
        key: its coordinates.
        ladder: knob values, mildest first.
        statuses: per rung, the low-precision run's status (`STATUSES`).
        control_statuses: per rung, its float32 control's.
    """

    key: FrontierKey
    ladder: tuple[float, ...]
    statuses: tuple[str, ...]
    control_statuses: tuple[str, ...]

    def breaking_point(self, side: str) -> float | None:
        """The mildest rung whose run broke (``side`` names the run or the control, as in
        `SIDES`); None where none broke."""
        statuses = getattr(self, SIDES[side])
        return next((v for v, s in zip(self.ladder, statuses, strict=True) if s == "broke"), None)

    def position(self, side: str) -> int | None:
        """The breaking point's index on the ladder, ``len(ladder)`` where every rung held;
        None where a missing rung milder than it leaves it unknown."""
        for index, status in enumerate(getattr(self, SIDES[side])):
            if status == "missing":
                return None
            if status == "broke":
                return index
        return len(self.ladder)

    def shown(self, position: int | None) -> str:
        """A position as the table shows it: the rung, ``held everywhere`` or ``unknown``."""
        if position is None:
            return "unknown"
        if position >= len(self.ladder):
            return "held everywhere"
        return rung_label(self.ladder[position])


def frontier_from_entry(entry: dict[str, Any]) -> Frontier:
    """A `Frontier` from an entry of ``precision_lab.run.frontiers.frontier_entries``."""
    rungs = entry["rungs"]
    return Frontier(
        key=FrontierKey(*(entry[name] for name in FRONTIER_KEY_FIELDS)),
        ladder=tuple(entry["ladder"]),
        statuses=tuple(rung["status"] for rung in rungs),
        control_statuses=tuple(rung["control_status"] for rung in rungs),
    )


def index_frontiers(frontiers: Iterable[Frontier], source: str) -> dict[FrontierKey, Frontier]:
    """Frontiers by key, refusing two with the same key."""
    indexed: dict[FrontierKey, Frontier] = {}
    for frontier in frontiers:
        if frontier.key in indexed:
            raise UsageError(
                f"{source} holds two frontiers with the same key {frontier.key.label}."
            )
        indexed[frontier.key] = frontier
    return indexed


def frontier_document(frontier: Frontier) -> dict[str, Any]:
    """What a baseline stores of a frontier (`read_frontier` reads it back)."""
    return {
        "key": frontier.key.as_dict(),
        "ladder": list(frontier.ladder),
        "statuses": list(frontier.statuses),
        "control_statuses": list(frontier.control_statuses),
        **{side: frontier.breaking_point(side) for side in SIDES},
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_frontier(document: Any, where: str) -> Frontier:
    """A baseline's frontier, checked.

    Raises:
        UsageError: a field is absent or of the wrong type, a status unknown, the statuses
            not one per rung, or a stored breaking point other than the statuses give.
    """

    def refuse(what: str) -> UsageError:
        return UsageError(f"{where}: frontier {label} {what}; refresh it.")

    label = "?"
    if not isinstance(document, dict) or not isinstance(document.get("key"), dict):
        raise refuse("is not an object with a key")
    key = document["key"]
    label = "/".join(str(key.get(name)) for name in FRONTIER_KEY_FIELDS)
    texts = FRONTIER_KEY_FIELDS[:-1]
    if (
        not all(isinstance(key.get(name), str) for name in texts)
        or type(key.get("seed")) is not int
    ):
        raise refuse(f"has key {key!r}, but {', '.join(texts)} must be strings and seed an integer")
    ladder = document.get("ladder")
    if not isinstance(ladder, list) or not ladder or not all(map(_is_number, ladder)):
        raise refuse(f"has ladder {ladder!r}, but a ladder is a non-empty list of numbers")
    for name in SIDES.values():
        statuses = document.get(name)
        if not isinstance(statuses, list) or len(statuses) != len(ladder):
            raise refuse(f"has {name} {statuses!r}, but it needs one per rung ({len(ladder)})")
        if not set(statuses) <= set(STATUSES):
            raise refuse(f"has {name} {statuses!r}, but each must be one of {', '.join(STATUSES)}")
    frontier = Frontier(
        FrontierKey(**key),
        tuple(ladder),
        tuple(document["statuses"]),
        tuple(document["control_statuses"]),
    )
    for side in SIDES:
        if document.get(side) != frontier.breaking_point(side):
            raise refuse(
                f"has {side} = {document.get(side)!r}, but its statuses break at "
                f"{frontier.breaking_point(side)!r}"
            )
    return frontier


def permutation_p_lower(current: list[int], baseline: list[int]) -> float:
    """One-sided exact permutation test: are the current positions lower (milder)?

    Under the null hypothesis both runs' positions come from one distribution, so every way
    of choosing which ``len(current)`` of the pooled positions are the current run's is as
    likely. The p-value is the share of those choices whose sum is at most the observed
    sum of ``current``, counted exactly (a dynamic programme over how many positions were
    chosen and their sum, in integers).

    Returns:
        The p-value, in (0, 1].
    """
    pooled = [*current, *baseline]
    n = len(current)
    ways: list[Counter[int]] = [Counter({0: 1}), *(Counter() for _ in range(n))]
    for value in pooled:
        for chosen in range(n, 0, -1):
            for total, count in ways[chosen - 1].items():
                ways[chosen][total + value] += count
    observed = sum(current)
    as_low = sum(count for total, count in ways[n].items() if total <= observed)
    return as_low / math.comb(len(pooled), n)


def median_position(positions: list[int]) -> int:
    """The median position, the milder (lower) middle one for an even number of seeds."""
    return statistics.median_low(positions)


def moved(current: int, baseline: int) -> str:
    """The change of a position in rungs, as the table shows it."""
    if current == baseline:
        return ""
    rungs = abs(current - baseline)
    return f"{rungs} rung{'s' * (rungs != 1)} {'milder' if current < baseline else 'harsher'}"


def on_ladder(current: Frontier, baseline: Frontier, source: str, against: str) -> Frontier:
    """``current`` on the baseline's ladder: a rung the run directory lacks (its run was
    removed from the summary) is ``missing``, so positions compare rung by rung.

    Raises:
        UsageError: ``current`` has a rung the baseline's ladder lacks (the ladder changed).
    """
    if current.ladder == baseline.ladder:
        return current
    if not set(current.ladder) <= set(baseline.ladder):
        shown = ", ".join(map(rung_label, current.ladder))
        was = ", ".join(map(rung_label, baseline.ladder))
        raise UsageError(
            f"Frontier {current.key.label} of {source} climbs the ladder ({shown}) but the "
            f"baseline {against}'s climbs ({was}): refresh the baseline for the new ladder."
        )
    runs = dict(zip(current.ladder, current.statuses, strict=True))
    controls = dict(zip(current.ladder, current.control_statuses, strict=True))
    return Frontier(
        current.key,
        baseline.ladder,
        tuple(runs.get(value, "missing") for value in baseline.ladder),
        tuple(controls.get(value, "missing") for value in baseline.ladder),
    )


def _frontier_verdict(check: str, label: str, key: FrontierKey | None, **fields: Any) -> Verdict:
    return Verdict(check=f"frontier.{check}", run=label, key=key and key.as_dict(), **fields)


def judge_frontier(side: str, current: Frontier, baseline: Frontier) -> Verdict:
    """One frontier of one seed: fails when its breaking point moved milder on the ladder
    (`precision_lab.gate.frontiers`), ``better`` when harsher."""
    now, was = current.position(side), baseline.position(side)
    common = {"baseline": baseline.shown(was), "current": current.shown(now)}
    if now is None or was is None:
        whose = "this run's" if now is None else "the baseline's"
        reason = f"{whose} breaking point is unknown: a milder rung did not run"
        return _frontier_verdict(
            side, current.key.label, current.key, status=SKIP, **common, message=reason
        )
    change = moved(now, was)
    if now < was:
        message = (
            f"{current.key.label}: {side.replace('_', ' ')} moved {change}: breaks at "
            f"{current.shown(now)} where the baseline broke at {baseline.shown(was)}"
        )
        return _frontier_verdict(
            side,
            current.key.label,
            current.key,
            status=FAIL,
            **common,
            change=change,
            message=message,
        )
    status = BETTER if now > was else OK
    return _frontier_verdict(
        side, current.key.label, current.key, status=status, **common, change=change
    )


def _seeds_shown(frontiers: list[Frontier], positions: list[int]) -> str:
    seeds = ", ".join(f.shown(p) for f, p in zip(frontiers, positions, strict=True))
    return f"median {frontiers[0].shown(median_position(positions))} ({seeds})"


def judge_frontier_seeds(
    side: str, current: list[Frontier], baseline: list[Frontier], alpha: float
) -> Verdict:
    """One frontier configuration over several seeds: fails when the current positions are
    significantly milder (`permutation_p_lower` < ``alpha``), ``better`` when significantly
    harsher. Seeds whose position is unknown (a milder rung did not run) are left out."""
    label = baseline[0].key.config_label
    pairs = [(f, f.position(side)) for f in current]
    base_pairs = [(f, f.position(side)) for f in baseline]
    now = [(f, p) for f, p in pairs if p is not None]
    was = [(f, p) for f, p in base_pairs if p is not None]
    if not now or not was:
        reason = "no seed's breaking point is known on " + (
            "this run" if not now else "the baseline"
        )
        return _frontier_verdict(side, label, None, status=SKIP, message=reason)
    now_frontiers, now_positions = map(list, zip(*now, strict=True))
    was_frontiers, was_positions = map(list, zip(*was, strict=True))
    p_worse = permutation_p_lower(now_positions, was_positions)
    p_better = permutation_p_lower(was_positions, now_positions)
    common = {
        "baseline": _seeds_shown(was_frontiers, was_positions),
        "current": _seeds_shown(now_frontiers, now_positions),
        "change": f"p={p_worse:.3g}",
        "p_value": p_worse,
    }
    if p_worse < alpha:
        message = (
            f"{label}: {side.replace('_', ' ')} moved milder over {len(now_positions)} seeds: "
            f"{common['current']} against {common['baseline']} in the baseline (one-sided "
            f"permutation test p = {p_worse:.3g} < alpha {alpha:g})"
        )
        return _frontier_verdict(side, label, None, status=FAIL, message=message, **common)
    return _frontier_verdict(side, label, None, status=BETTER if p_better < alpha else OK, **common)


def judge_frontiers(current: RunSet, baseline: RunSet, alpha: float) -> list[Verdict]:
    """Every frontier check (`precision_lab.gate.frontiers`): per frontier with one seed per
    configuration, per configuration with several; a baseline frontier the run directory
    lacks fails ``coverage.frontier``, a new one is ``new``.

    Raises:
        UsageError: a frontier has a rung its baseline's ladder lacks.
    """
    verdicts: list[Verdict] = []
    seeds: dict[tuple[str, ...], list[FrontierKey]] = {}
    for key in baseline.frontiers:
        seeds.setdefault(key.config, []).append(key)
    aligned = {
        key: on_ladder(frontier, baseline.frontiers[key], current.source, baseline.source)
        for key, frontier in current.frontiers.items()
        if key in baseline.frontiers
    }
    for keys in seeds.values():
        for key in keys:
            if key not in aligned:
                message = (
                    f"{key.label}: frontier is in the baseline but missing from {current.source}"
                )
                verdicts.append(
                    Verdict("coverage.frontier", key.label, key.as_dict(), FAIL, message=message)
                )
        present = [key for key in keys if key in aligned]
        if not present:
            continue
        for side in SIDES:
            if len(keys) == 1:
                only = keys[0]
                verdicts.append(judge_frontier(side, aligned[only], baseline.frontiers[only]))
            else:
                verdicts.append(
                    judge_frontier_seeds(
                        side,
                        [aligned[key] for key in present],
                        [baseline.frontiers[key] for key in keys],
                        alpha,
                    )
                )
    for key in current.frontiers.keys() - baseline.frontiers.keys():
        verdicts.append(
            Verdict(
                "coverage.frontier",
                key.label,
                key.as_dict(),
                NEW,
                message="not in the baseline: refresh it to gate this frontier",
            )
        )
    return verdicts
