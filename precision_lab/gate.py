"""The CI gate: compare a run directory with a baseline and fail what got worse.

Every comparison is a tiny check with ``fails(current, baseline) -> message | None`` (the
pytest-benchmark pattern). The gate runs every check on every pair of runs matched by key
(``precision_lab.baseline.RunKey``), collects all verdicts, and reports them once; it never
stops at the first failure.

Checks and their defaults (all figures as DESIGN.md defines them):

===========================  ================================================================
memory.optimizer_state_bytes  fails when ``cur > base (1 + memory_tolerance)``; default 0: the
                              bytes are a deterministic function of the shapes and structures.
memory.peak_memory_bytes      fails when ``cur > base (1 + peak_tolerance) + peak_floor``;
                              default 10% + a floor by the baseline's device: 64 MiB on the
                              CPU, whose resident-set high-water mark moves by tens of MiB
                              with the allocator and the page cache; 2 MiB on CUDA, whose
                              allocator peak repeats up to its 2 MiB block rounding.
stability.diverged            fails when the run diverges and its baseline did not.
stability.nan_events,         fails when the count (steps with any NaN / Inf in a watched
stability.inf_events          tensor) is positive where the baseline's was 0.
stability.first_nonfinite     fails when the first non-finite step comes earlier than
                              ``base (1 - nonfinite_tolerance)`` (default 20%: divergence times
                              in low precision are chaotic), or appears where there was none.
stability.max_condition       fails when ``cur > base * condition_factor`` (default 10).
stability.underflow_fraction  fails when ``cur - base > underflow_tolerance`` (default 0.01,
                              an absolute fraction of nonzero values).
learning.final_loss           fails when ``cur - base > loss_tolerance |base|`` (default 5%).
learning.accuracy             fails when ``base - cur > loss_tolerance base``.
stability.error               fails when a run crashed (``error`` set) where its baseline ran.
coverage.run                  fails when a baseline run is missing from the run directory,
                              or did not finish (its figures are then not compared).
===========================  ================================================================

The learning checks are skipped for a run whose baseline diverged: its final loss is
whatever the chaos left, and the stability checks already cover it. Anything that got
better by more than the check's tolerance (the band is symmetric, so noise is not
progress) is reported as ``better``, never as a failure. Runs without a baseline are reported
as ``new``.

Step time is never gated against stored numbers, which belong to another machine. With a
second run directory of the same job (``against``), the gate reports each run's step-time
ratio ``t_current / t_against`` and their geometric mean; the geometric mean alone can fail,
and only when ``max_slowdown`` is given, because single runs of about a second on a shared
CPU vary by tens of percent.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from precision_lab.baseline import RunKey, RunSet
from precision_lab.errors import UsageError

FAIL, BETTER, OK, NEW, SKIP = "fail", "better", "ok", "new", "skip"
# Failures first, then what a reviewer should notice, then the unremarkable.
STATUS_ORDER = {FAIL: 0, BETTER: 1, NEW: 2, OK: 3, SKIP: 4}

MIB = 2**20


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _not_finite(figure: str, value: Any) -> str:
    return f"{figure} is {format_value(figure, value)} (non-finite or not recorded)"


def format_value(figure: str, value: Any) -> str:
    """A figure for a table cell: bytes in B or MiB, counts as integers, null as ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if figure == "optimizer_state_bytes":
        return f"{int(value):,} B"
    if figure == "peak_memory_bytes":
        return f"{value / MIB:,.1f} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Check:
    """One comparison of one figure between a run and its baseline.

    Subclasses define ``fails`` and ``improves``, and ``change`` where a relative change
    is not the natural measure.

    Attributes:
        category: ``memory``, ``stability`` or ``learning``.
        figure: the run-object field compared.
    """

    category: str
    figure: str

    @property
    def name(self) -> str:
        """``category.figure``, as tables and JSON name the check."""
        return f"{self.category}.{self.figure}"

    def fails(self, current: Any, baseline: Any) -> str | None:
        """Why ``current`` is a regression against ``baseline``, or None when it is not."""
        raise NotImplementedError

    def improves(self, current: Any, baseline: Any) -> bool:
        """Whether ``current`` is better than ``baseline`` beyond the check's tolerance."""
        raise NotImplementedError

    def change(self, current: Any, baseline: Any) -> str:
        """The change from baseline to current, relative where that means something."""
        if isinstance(current, bool) or isinstance(baseline, bool):
            if current == baseline:
                return ""
            return f"{format_value('', baseline)} -> {format_value('', current)}"
        if not (_is_number(current) and _is_number(baseline)):
            return "" if current == baseline else "changed"
        if baseline == 0:
            return "" if current == 0 else f"{current - baseline:+.4g}"
        return f"{(current - baseline) / abs(baseline):+.1%}"

    def applies(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
        """Why this check does not compare these runs, or None when it does."""
        return None


@dataclass(frozen=True)
class AtMost(Check):
    """Fails when ``current > baseline (1 + tolerance) + floor``: bytes, loss.

    A null current where the baseline had a number (a loss that turned non-finite) fails.
    """

    tolerance: float = 0.0
    floor: float = 0.0

    def fails(self, current: Any, baseline: Any) -> str | None:
        if not _is_number(baseline):
            return None
        if not _is_number(current):
            return _not_finite(self.figure, current)
        limit = baseline + self.tolerance * abs(baseline) + self.floor
        if current <= limit:
            return None
        allowed = f"tolerance {_percent(self.tolerance)}"
        if self.floor:
            allowed += f" + {format_value(self.figure, self.floor)}"
        return (
            f"{self.figure} {format_value(self.figure, current)} exceeds "
            f"{format_value(self.figure, limit)} ({allowed})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        # The tolerance band is symmetric: noise below the baseline is no improvement.
        if not (_is_number(current) and _is_number(baseline)):
            return False
        return current < baseline - self.tolerance * abs(baseline) - self.floor


@dataclass(frozen=True)
class AtLeast(Check):
    """Fails when ``current < baseline - tolerance |baseline|``: accuracy."""

    tolerance: float = 0.0

    def fails(self, current: Any, baseline: Any) -> str | None:
        if not _is_number(baseline):
            return None
        if not _is_number(current):
            return _not_finite(self.figure, current)
        limit = baseline - self.tolerance * abs(baseline)
        if current >= limit:
            return None
        return (
            f"{self.figure} {format_value(self.figure, current)} is below "
            f"{format_value(self.figure, limit)} (tolerance {_percent(self.tolerance)})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if not (_is_number(current) and _is_number(baseline)):
            return False
        return current > baseline + self.tolerance * abs(baseline)


@dataclass(frozen=True)
class NoneWhereNone(Check):
    """Fails when a count (or flag) is positive where the baseline's was zero (or false).

    Counts of non-finite events after a run has broken are not compared with each other:
    once a run breaks in both, how many steps stay broken says nothing new.
    """

    def fails(self, current: Any, baseline: Any) -> str | None:
        if baseline or not current:
            return None
        shown = "yes" if current is True else format_value(self.figure, current)
        return f"{self.figure} is {shown} where the baseline had none"

    def improves(self, current: Any, baseline: Any) -> bool:
        # Only "none where there were some" is progress; fewer broken steps is chaos.
        return bool(baseline) and not current


@dataclass(frozen=True)
class NotEarlier(Check):
    """Fails when a step comes earlier than ``baseline (1 - tolerance)``, or newly appears."""

    tolerance: float = 0.2

    def fails(self, current: Any, baseline: Any) -> str | None:
        if current is None:
            return None
        if baseline is None:
            return f"{self.figure} is step {current} where the baseline stayed finite"
        limit = baseline * (1 - self.tolerance)
        if current >= limit:
            return None
        return (
            f"{self.figure} is step {current}, earlier than step {limit:.4g} "
            f"(baseline step {baseline}, tolerance {_percent(self.tolerance)})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if baseline is None:
            return False
        return current is None or current > baseline * (1 + self.tolerance)


@dataclass(frozen=True)
class GrowthFactor(Check):
    """Fails when ``current > factor * baseline``: condition numbers span decades."""

    factor: float = 10.0

    def fails(self, current: Any, baseline: Any) -> str | None:
        if not _is_number(baseline):
            return None
        if not _is_number(current):
            return _not_finite(self.figure, current)
        if current <= self.factor * baseline:
            return None
        return (
            f"{self.figure} {current:.4g} is more than {self.factor:g}x the baseline's "
            f"{baseline:.4g}"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if not (_is_number(current) and _is_number(baseline)):
            return False
        return current * self.factor < baseline

    def change(self, current: Any, baseline: Any) -> str:
        if _is_number(current) and _is_number(baseline) and baseline > 0:
            return f"x{current / baseline:.3g}"
        return super().change(current, baseline)


@dataclass(frozen=True)
class AbsoluteGrowth(Check):
    """Fails when ``current - baseline > tolerance``: fractions, compared in absolute terms."""

    tolerance: float = 0.01

    def fails(self, current: Any, baseline: Any) -> str | None:
        if not (_is_number(current) and _is_number(baseline)):
            return None
        if current - baseline <= self.tolerance:
            return None
        return (
            f"{self.figure} {current:.4g} grew by {current - baseline:.4g} over the baseline's "
            f"{baseline:.4g} (tolerance {self.tolerance:g})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if not (_is_number(current) and _is_number(baseline)):
            return False
        return baseline - current > self.tolerance

    def change(self, current: Any, baseline: Any) -> str:
        if _is_number(current) and _is_number(baseline):
            return f"{current - baseline:+.4g}"
        return super().change(current, baseline)


@dataclass(frozen=True)
class Learning(Check):
    """A learning check, not compared when the baseline run diverged."""

    def applies(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
        if baseline_run.get("diverged"):
            return "the baseline diverged: its final figures are chaotic"
        return None


@dataclass(frozen=True)
class LossAtMost(Learning, AtMost):
    """``final_loss`` may rise by at most ``tolerance |baseline|``."""


@dataclass(frozen=True)
class AccuracyAtLeast(Learning, AtLeast):
    """``accuracy`` may fall by at most ``tolerance * baseline``."""


def default_peak_floor(device: str | None) -> float:
    """Absolute peak-memory slack in bytes: 2 MiB on CUDA, 64 MiB elsewhere (module doc)."""
    return 2 * MIB if device is not None and device.startswith("cuda") else 64 * MIB


@dataclass(frozen=True)
class Tolerances:
    """The gate's thresholds, as fractions (0.1 = 10%) or factors.

    Attributes:
        memory: allowed relative growth of optimizer-state bytes.
        peak: allowed relative growth of peak memory, on top of ``peak_floor``.
        peak_floor: allowed absolute growth of peak memory (bytes); None: by the
            baseline's device (``default_peak_floor``).
        condition_factor: allowed growth factor of the largest condition number.
        nonfinite: allowed relative advance of the first non-finite step.
        underflow: allowed absolute growth of the underflow fraction.
        loss: allowed relative rise of the final loss and fall of the accuracy.
        max_slowdown: geometric-mean step-time ratio above which ``--against`` fails;
            None: step times are reported, never gated.
    """

    memory: float = 0.0
    peak: float = 0.10
    peak_floor: float | None = None
    condition_factor: float = 10.0
    nonfinite: float = 0.20
    underflow: float = 0.01
    loss: float = 0.05
    max_slowdown: float | None = None

    def for_device(self, device: str | None) -> Tolerances:
        """These thresholds with the peak floor set for the baseline's device if unset."""
        if self.peak_floor is not None:
            return self
        return replace(self, peak_floor=default_peak_floor(device))

    def checks(self) -> list[Check]:
        """The checks these thresholds define, in the order tables list them."""
        floor = default_peak_floor(None) if self.peak_floor is None else self.peak_floor
        return [
            AtMost("memory", "optimizer_state_bytes", tolerance=self.memory),
            AtMost("memory", "peak_memory_bytes", tolerance=self.peak, floor=floor),
            NoneWhereNone("stability", "diverged"),
            NoneWhereNone("stability", "error"),
            NoneWhereNone("stability", "nan_events"),
            NoneWhereNone("stability", "inf_events"),
            NotEarlier("stability", "first_nonfinite_step", tolerance=self.nonfinite),
            GrowthFactor("stability", "max_condition", factor=self.condition_factor),
            AbsoluteGrowth("stability", "underflow_fraction", tolerance=self.underflow),
            LossAtMost("learning", "final_loss", tolerance=self.loss),
            AccuracyAtLeast("learning", "accuracy", tolerance=self.loss),
        ]


@dataclass(frozen=True)
class Verdict:
    """One check on one run: what was compared and what the gate concluded.

    Attributes:
        check: ``category.figure``.
        run: the run's key label; ``key`` the key itself.
        status: ``fail``, ``better``, ``ok``, ``new`` (no baseline) or ``skip``.
        baseline, current: the figure's values (null where non-finite or absent).
        change: the change, as the check measures it (relative, factor or absolute).
        message: for a failure, the run and the figure and by how much; else a note.
    """

    check: str
    run: str
    key: dict[str, Any] | None
    status: str
    baseline: Any = None
    current: Any = None
    change: str = ""
    message: str = ""


@dataclass
class GateResult:
    """Every verdict of one gate, and the step-time comparison if one was asked for."""

    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)
    timing: dict[str, Any] | None = None
    tolerances: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[Verdict]:
        """The failed verdicts, in table order."""
        return [verdict for verdict in self.verdicts if verdict.status == FAIL]

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return not self.failures

    def counts(self) -> dict[str, int]:
        """How many verdicts of each status."""
        return {status: sum(v.status == status for v in self.verdicts) for status in STATUS_ORDER}

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready object (the ``--json`` output)."""
        return {
            "passed": self.passed,
            "counts": self.counts(),
            "failures": [verdict.message for verdict in self.failures],
            "notes": self.notes,
            "tolerances": self.tolerances,
            "checks": [asdict(verdict) for verdict in self.verdicts],
            "timing": self.timing,
        }


def judge(check: Check, key: RunKey, current_run: dict, baseline_run: dict) -> Verdict:
    """Run one check on one matched pair of runs."""
    current, baseline = current_run.get(check.figure), baseline_run.get(check.figure)
    common = {"check": check.name, "run": key.label, "key": key.as_dict()}
    common |= {"baseline": baseline, "current": current}
    reason = check.applies(current_run, baseline_run)
    if reason is not None:
        return Verdict(**common, status=SKIP, message=reason)
    change = check.change(current, baseline)
    message = check.fails(current, baseline)
    if message is not None:
        return Verdict(**common, status=FAIL, change=change, message=f"{key.label}: {message}")
    status = BETTER if check.improves(current, baseline) else OK
    return Verdict(**common, status=status, change=change)


def _coverage(key: RunKey, status: str, message: str) -> Verdict:
    return Verdict(
        check="coverage.run", run=key.label, key=key.as_dict(), status=status, message=message
    )


def _notes(current: RunSet, baseline: RunSet) -> list[str]:
    """What differs in how the figures were made: a reader judges those changes, not the gate."""
    notes = []
    for name in ("versions", "device"):
        was, now = baseline.environment.get(name), current.environment.get(name)
        if was and now and was != now:
            notes.append(f"The baseline's {name} differ from this run's: {was} -> {now}.")
    for key, base_run in baseline.runs.items():
        was = base_run.get("hyperparameters")
        now = current.runs.get(key, {}).get("hyperparameters")
        if was and now and was != now:
            changed = {name: (was.get(name), now.get(name)) for name in was.keys() | now.keys()}
            changed = {name: pair for name, pair in sorted(changed.items()) if pair[0] != pair[1]}
            shown = ", ".join(f"{name} {a!r} -> {b!r}" for name, (a, b) in changed.items())
            notes.append(f"{key.label} ran with other hyperparameters: {shown}.")
    return notes


def compare_step_times(
    current: RunSet, reference: RunSet, max_slowdown: float | None
) -> tuple[list[Verdict], dict[str, Any]]:
    """Step-time ratios ``t_current / t_reference`` of runs made in the same job.

    Returns:
        One ``time.step_time_ms`` verdict per matched run (``ok``, or ``better`` for a ratio
        below 1; never ``fail``), and a summary with the geometric mean of the ratios, which
        fails only when ``max_slowdown`` is given and the mean exceeds it.
    """
    if reference.suite != current.suite:
        raise UsageError(
            f"--against ran suite {reference.suite!r} but the run directory ran "
            f"{current.suite!r}: compare step times of the same suite."
        )
    verdicts, ratios = [], []
    for key, run in current.runs.items():
        other = reference.runs.get(key)
        now = run.get("step_time_ms")
        was = other.get("step_time_ms") if other else None
        if not (_is_number(now) and _is_number(was) and was > 0):
            continue
        ratio = now / was
        ratios.append(ratio)
        verdicts.append(
            Verdict(
                check="time.step_time_ms",
                run=key.label,
                key=key.as_dict(),
                status=BETTER if ratio < 1 else OK,
                baseline=was,
                current=now,
                change=f"x{ratio:.3g}",
            )
        )
    if not ratios:
        raise UsageError(
            f"{reference.source} shares no timed run with {current.source}: "
            "--against needs a run directory of the same suite."
        )
    geomean = math.exp(sum(math.log(ratio) for ratio in ratios) / len(ratios))
    failed = max_slowdown is not None and geomean > max_slowdown
    summary = {
        "against": reference.source,
        "runs": len(ratios),
        "geometric_mean_ratio": geomean,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "max_slowdown": max_slowdown,
        "passed": not failed,
    }
    if failed:
        verdicts.insert(
            0,
            Verdict(
                check="time.geometric_mean",
                run="all runs",
                key=None,
                status=FAIL,
                current=geomean,
                change=f"x{geomean:.3g}",
                message=(
                    f"all runs: step time is x{geomean:.3g} that of {reference.source} "
                    f"(geometric mean over {len(ratios)} runs; allowed x{max_slowdown:g})"
                ),
            ),
        )
    return verdicts, summary


def gate(
    current: RunSet,
    baseline: RunSet,
    tolerances: Tolerances | None = None,
    against: RunSet | None = None,
) -> GateResult:
    """Compare every run of ``current`` with its baseline; collect every verdict.

    Args:
        current: the runs to gate (``read_run_dir``).
        baseline: the baseline's runs (``read_baseline``).
        tolerances: thresholds; the defaults of ``Tolerances`` when None.
        against: a run directory of the same job whose step times are compared.

    Returns:
        Every verdict, failures first, and notes on environment differences.

    Raises:
        UsageError: the suites differ, or no run of ``current`` has a baseline.
    """
    tolerances = tolerances or Tolerances()
    if current.suite != baseline.suite:
        raise UsageError(
            f"The run directory ran suite {current.suite!r} but the baseline is for suite "
            f"{baseline.suite!r}: gate against a baseline of the same suite."
        )
    for name, was in baseline.settings.items():
        now = current.settings.get(name)
        if was is not None and now is not None and was != now:
            raise UsageError(
                f"The run directory ran with {name} = {now!r} but the baseline with {was!r}: "
                "rerun the suite with the baseline's settings."
            )
    if not current.runs.keys() & baseline.runs.keys():
        had = sorted({key.dtype for key in baseline.runs})
        has = sorted({key.dtype for key in current.runs})
        raise UsageError(
            f"No run of {current.source} is in baseline {baseline.source} (baseline dtypes "
            f"{', '.join(had)}; run dtypes {', '.join(has)}): pass the baseline made for this "
            "suite and dtype."
        )
    verdicts: list[Verdict] = []
    tolerances = tolerances.for_device(baseline.environment.get("device"))
    checks = tolerances.checks()
    for key, base_run in baseline.runs.items():
        run = current.runs.get(key)
        if run is None:
            missing = f"{key.label}: run is in the baseline but missing from {current.source}"
            verdicts.append(_coverage(key, FAIL, missing))
        elif base_run.get("finished") and not run.get("finished"):
            unfinished = f"{key.label}: run did not finish in {current.source}"
            verdicts.append(_coverage(key, FAIL, unfinished))
        else:
            verdicts.extend(judge(check, key, run, base_run) for check in checks)
    for key in current.runs.keys() - baseline.runs.keys():
        verdicts.append(_coverage(key, NEW, "not in the baseline: refresh it to gate this run"))
    timing = None
    if against is not None:
        time_verdicts, timing = compare_step_times(current, against, tolerances.max_slowdown)
        verdicts.extend(time_verdicts)
    verdicts.sort(key=lambda v: (STATUS_ORDER[v.status], v.run, v.check))
    return GateResult(verdicts, _notes(current, baseline), timing, asdict(tolerances))


_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KiB|MiB|GiB|kB|MB|GB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_UNITS |= {"kB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_fraction(text: str | float, option: str) -> float:
    """``"10%"`` or ``"0.1"`` as the fraction 0.1; refuses negative or unparsable values."""
    match = _FRACTION.match(str(text))
    if match is None:
        raise UsageError(
            f"{option} must be a non-negative percentage like 10% or a fraction like 0.1, "
            f"not {text!r}."
        )
    value = float(match.group(1))
    return value / 100 if match.group(2) else value


def parse_factor(text: str | float, option: str) -> float:
    """A growth factor >= 1, such as ``10``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"{option} must be a number >= 1 such as 10, not {text!r}.")
    return value


def parse_size(text: str | float, option: str) -> float:
    """``"64MiB"``, ``"1GB"`` or a plain number of bytes, in bytes."""
    match = _SIZE.match(str(text))
    if match is None:
        raise UsageError(
            f"{option} must be a size like 64MiB, 1GiB or a number of bytes, not {text!r}."
        )
    return float(match.group(1)) * _UNITS[match.group(2)]
