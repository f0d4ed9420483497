"""The CI gate: compare a run directory with a baseline and fail what got worse.

Every comparison is a tiny check with ``fails(current, baseline) -> message | None`` (the
pytest-benchmark pattern). The gate runs every check on every pair of runs matched by key
(``precision_lab.gate.baseline.RunKey``), collects all verdicts, and reports them once; it never
stops at the first failure.

**Signal and rounding noise.** A verdict must not depend on the thread count or the CPU:
another thread count sums in another order, another CPU vectorises differently, and the
last bits of every floating-point result move. For each gated figure, what the code under
test determines is compared and what rounding decides is not:

===========================  ================================================================
memory.optimizer_state_bytes  all signal: the bytes are a function of shapes, structures and
                              dtypes. Fails when ``cur > base (1 + memory_tolerance)``,
                              default 0 (exact).
memory.peak_memory_bytes      allocator and page-cache noise of tens of MiB on the CPU: fails
                              when ``cur > base (1 + peak_tolerance) + peak_floor``, default
                              10% + a floor by the baseline's device (64 MiB on the CPU, whose
                              resident-set high-water mark moves with the allocator and the
                              page cache; 2 MiB on CUDA, whose allocator peak repeats up to its
                              2 MiB block rounding).
memory.peak_tensor_bytes      all signal but for an operation's choice of kernel: the live
                              tensors an operation returns are a function of shapes, dtypes
                              and the code path (equal on 1 and 2 threads). Fails when ``cur >
                              base (1 + tensor_tolerance) + 16 KiB``, default 5%. Baselines
                              made before the figure existed lack it: not compared there.
stability.diverged,           whether a run *broke* (diverged or raised; ``run.summary.broke``) is
stability.error               signal. One seed per configuration: fails when the run breaks
                              where its baseline did not. Several seeds: judged per
                              configuration by ``stability.seeds_broken`` below instead.
stability.first_nonfinite     *when* a run broke is signal within ``nonfinite_tolerance``: fails
                              when the first non-finite step comes earlier than
                              ``base (1 - tolerance)`` (default 20%), or, in a run that did not
                              break, appears where there was none. Not compared where only one
                              of the two runs broke (that is the check above).
stability.nan_events,         whether a run that did not break saw any NaN / Inf is signal:
stability.inf_events          fails when positive where the baseline's was 0. Once a run broke,
                              which non-finite value came first and for how many steps is
                              rounding chaos: not compared where either run broke.
stability.max_condition       saturated at ``1/eps`` of the dtype the factors are held in
                              (``condition_ceiling``: float32 8.4e6, float16 1024, bfloat16 128):
                              a rounding of relative size eps moves ``sigma_min`` by up to
                              ``eps sigma_max``, so a condition number carries a relative
                              uncertainty of ``eps cond``, and at ``1/eps`` its digits are
                              noise. Both values are clipped at that ceiling (a non-finite one
                              is saturated), then growth beyond ``condition_factor`` (default
                              10, one decade on a log scale) fails. Not compared where either
                              run broke (its largest value comes from the broken steps).
stability.underflow_fraction  fails when ``cur - base > underflow_tolerance`` (default 0.01, an
                              absolute fraction of nonzero values); not compared where either
                              run broke.
learning.final_loss           fails when ``cur - base > loss_tolerance |base|`` (default 5%);
learning.accuracy             fails when ``base - cur > loss_tolerance base``. Neither is
                              compared where either run broke: a broken run's last loss is
                              whatever the chaos left.
stability.seeds_broken        with several seeds per configuration in the baseline: fails when
                              the current run breaks in significantly more seeds than the
                              baseline, by a one-sided Fisher exact test at level ``alpha``
                              (default 0.01; ``fisher_exact_greater``).
coverage.run                  fails when a baseline run is missing from the run directory, or
                              stopped without a result (interrupted: its figures are then not
                              compared). A run that raised is a result: it broke.
frontier.breaking_point,      a frontier's breaking point, as its position on the ladder: fails
frontier.control_breaking_    when it moved milder (earlier) than the baseline's, is ``better``
point                         when harsher; with several seeds, by an exact one-sided permutation
                              test of the seeds' positions at level ``alpha`` (Fisher's test of
                              ``seeds_broken`` on a one-rung ladder). ``precision_lab.gate.
                              frontiers`` says how; ``coverage.frontier`` fails a baseline
                              frontier the run directory lacks.
===========================  ================================================================

The tolerances are well above the noise measured (1 against 2 threads on this 2-core
CPU: the quick suite in every dtype over 5 seeds, and the default suite's MLP with SINGD
diagonal, KFAC and AdamW over 2 seeds in bfloat16 and float16; 2, 3 and 4 threads gave
identical figures). In runs that did not break, final losses moved by at most 0.3% in
float32, 0.24% in float16 and 0.9% in bfloat16 (a few units in the last place of a loss
near 0.2); accuracy by one test image in 360 (0.28 points); underflow fractions by at most
6e-4; condition numbers below their ceiling by at most 1.5e-6 relative. Whether a run
broke, when, and the NaN/Inf counts of runs that did not break never moved. Above the
ceiling, condition numbers moved freely: float32 KFAC factors of 3.98e8 on one thread and
2.78e8 on two, and 4.24e9 on another CPU (10.6x, which failed CI under the former rule of
10x on raw values); bfloat16 KFAC factors of 340 and 380. No divergence here moved its
first non-finite step (float16 ones all at step 0; bfloat16 and float32 ones diverge by
loss growth, with none): the 20% is headroom for other CPUs, not a measured spread.
``failure_cause`` is not gated: it is a function of whether this run broke and whether
its float32 control broke, and both are judged on their own rows.

Anything that got better by more than the check's tolerance (the band is symmetric, so
noise is not progress) is reported as ``better``, never as a failure. Runs without a
baseline are reported as ``new``. A figure that cannot be compared (a baseline without
optimizer-state bytes for a run that did not break, a value of the wrong type) is an
error, never a pass: ``gate`` raises ``UsageError`` (exit 2).

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

from precision_lab.errors import UsageError
from precision_lab.gate.baseline import RunKey, RunSet, configurations
from precision_lab.gate.frontiers import judge_frontiers
from precision_lab.gate.verdicts import BETTER, FAIL, NEW, OK, SKIP, STATUS_ORDER, Verdict
from precision_lab.run.summary import broke

MIB = 2**20
TENSOR_FLOOR = 16 * 2**10
"""Growth of ``peak_tensor_bytes`` always allowed (B): a tensor or two of a small run."""

# Machine epsilon (the spacing of numbers just above 1) of the dtypes factors are held in.
EPSILON = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


class IncomparableError(Exception):
    """A check met a value it cannot compare; ``gate`` turns it into a `UsageError`."""


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
    if figure == "optimizer_state_bytes" and _is_number(value):
        return f"{int(value):,} B"
    if figure == "peak_tensor_bytes" and _is_number(value):
        return f"{value / 2**10:,.1f} KiB"
    if figure == "peak_memory_bytes" and _is_number(value):
        return f"{value / MIB:,.1f} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _broke_text(current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
    """Which of the two runs broke, as a skip reason; None when neither did."""
    now, was = bool(broke(current_run)), bool(broke(baseline_run))
    if not (now or was):
        return None
    which = "both runs" if now and was else "this run" if now else "the baseline run"
    return f"{which} broke: compared by whether and when it broke"


@dataclass(frozen=True)
class Check:
    """One comparison of one figure between a run and its baseline.

    Subclasses define ``fails`` and ``improves``, ``change`` where a relative change is not
    the natural measure, ``values`` where the compared values are not the raw figures, and
    ``applies`` where a pair of runs is not compared.

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

    def values(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> tuple:
        """``(current, baseline)``: what ``fails``, ``improves`` and ``change`` compare."""
        return current_run.get(self.figure), baseline_run.get(self.figure)

    def fails(self, current: Any, baseline: Any) -> str | None:
        """Why ``current`` is a regression against ``baseline``, or None when it is not.

        Raises:
            IncomparableError: the values cannot be compared (never a silent pass).
        """
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
class Numeric(Check):
    """A check of a number: null (non-finite or not recorded) or a finite number, else an
    error, so that a figure of the wrong type can never pass."""

    def values(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> tuple:
        pair = super().values(current_run, baseline_run)
        for whose, value in zip(("this run's", "the baseline's"), pair, strict=True):
            if value is not None and not _is_number(value):
                raise IncomparableError(f"{whose} {self.figure} = {value!r} is not a number")
        return pair


@dataclass(frozen=True)
class AtMost(Numeric):
    """Fails when ``current > baseline (1 + tolerance) + floor``: bytes, loss.

    A null current where the baseline had a number (a loss that turned non-finite) fails. A
    null baseline passes everything when null is the worst value (``null_is_worst``: a
    non-finite loss); otherwise (bytes: null is "not recorded") it cannot be compared.
    """

    tolerance: float = 0.0
    floor: float = 0.0
    null_is_worst: bool = True

    def fails(self, current: Any, baseline: Any) -> str | None:
        if baseline is None:
            if self.null_is_worst:
                return None
            raise IncomparableError(f"the baseline has no {self.figure} for it")
        if current is None:
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
        if current is None or baseline is None:
            return False
        return current < baseline - self.tolerance * abs(baseline) - self.floor


@dataclass(frozen=True)
class Bytes(AtMost):
    """Memory: null means "not recorded", which only a run that broke may leave."""

    null_is_worst: bool = False

    def applies(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
        if self.figure not in baseline_run:
            return "the baseline was made before this figure existed"
        if baseline_run.get(self.figure) is None and broke(baseline_run):
            return "the baseline run broke before recording it"
        return None


@dataclass(frozen=True)
class AtLeast(Numeric):
    """Fails when ``current < baseline - tolerance |baseline|``: accuracy."""

    tolerance: float = 0.0

    def fails(self, current: Any, baseline: Any) -> str | None:
        if baseline is None:
            return None
        if current is None:
            return _not_finite(self.figure, current)
        limit = baseline - self.tolerance * abs(baseline)
        if current >= limit:
            return None
        return (
            f"{self.figure} {format_value(self.figure, current)} is below "
            f"{format_value(self.figure, limit)} (tolerance {_percent(self.tolerance)})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if current is None or baseline is None:
            return False
        return current > baseline + self.tolerance * abs(baseline)


@dataclass(frozen=True)
class NoneWhereNone(Check):
    """Fails when a count (or flag) is positive where the baseline's was zero (or false)."""

    def fails(self, current: Any, baseline: Any) -> str | None:
        if baseline or not current:
            return None
        shown = "yes" if current is True else format_value(self.figure, current)
        return f"{self.figure} is {shown} where the baseline had none"

    def improves(self, current: Any, baseline: Any) -> bool:
        # Only "none where there were some" is progress; fewer broken steps is chaos.
        return bool(baseline) and not current


@dataclass(frozen=True)
class NotEarlier(Numeric):
    """Fails when a step comes earlier than ``baseline (1 - tolerance)``, or newly appears.

    Compared where both runs broke or neither did: whether a run broke is another check's.
    """

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

    def applies(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
        if bool(broke(current_run)) != bool(broke(baseline_run)):
            return _broke_text(current_run, baseline_run)
        return None


def factor_dtypes(run: dict[str, Any]) -> list[str]:
    """The dtypes a run's Kronecker factors are held in, as torch names.

    The weights' dtype (the run's dtype in ``pure`` mode, float32 master weights in
    ``mixed``), unless the hyperparameters name one (KFAC's ``factor_dtype``, SINGD's
    ``preconditioner_dtype`` pair, whose null entries keep the weights').
    """
    weights = run.get("dtype") if run.get("mode") == "pure" else "float32"
    hyperparameters = run.get("hyperparameters") or {}
    held: list[Any] = []
    for name in ("factor_dtype", "preconditioner_dtype"):
        if name in hyperparameters:
            value = hyperparameters[name]
            held.extend(value if isinstance(value, list) else [value])
    names = {weights if value is None else str(value).removeprefix("torch.") for value in held}
    return sorted(names or {weights})


def condition_ceiling(run: dict[str, Any]) -> float:
    """``1/eps`` of the coarsest dtype the run's factors are held in: where condition
    numbers saturate (module docstring); float32's when the dtype is unknown."""
    known = [EPSILON[name] for name in factor_dtypes(run) if name in EPSILON]
    eps = max(known, default=EPSILON["float32"])
    return 1 / eps


@dataclass(frozen=True)
class Level:
    """A condition number beside the ceiling where its digits turn into rounding noise.

    Attributes:
        value: the condition number; None where it was non-finite (saturated too).
        ceiling: ``condition_ceiling`` of its run.
    """

    value: float | None
    ceiling: float

    @property
    def saturated(self) -> bool:
        """At or beyond the ceiling: all it says is "saturated"."""
        return self.value is None or self.value >= self.ceiling

    @property
    def level(self) -> float:
        """The value clipped at the ceiling: what is compared."""
        return self.ceiling if self.saturated else self.value

    def __str__(self) -> str:
        shown = "non-finite" if self.value is None else f"{self.value:.4g}"
        if self.saturated:
            return f"{shown} (saturated: at or beyond 1/eps = {self.ceiling:.3g})"
        return shown


@dataclass(frozen=True)
class ConditionGrowth(Numeric):
    """Fails when the clipped ``current > factor * baseline`` (module docstring).

    Two nulls (a run without factors) compare equal.
    """

    factor: float = 10.0

    def values(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> tuple:
        current, baseline = super().values(current_run, baseline_run)
        if current is None and baseline is None:
            return None, None
        return (
            Level(current, condition_ceiling(current_run)),
            Level(baseline, condition_ceiling(baseline_run)),
        )

    def fails(self, current: Level | None, baseline: Level | None) -> str | None:
        if current is None or current.level <= self.factor * baseline.level:
            return None
        return f"{self.figure} {current} is more than {self.factor:g}x the baseline's {baseline}"

    def improves(self, current: Level | None, baseline: Level | None) -> bool:
        return current is not None and current.level * self.factor < baseline.level

    def change(self, current: Level | None, baseline: Level | None) -> str:
        if current is None:
            return ""
        if current.saturated and baseline.saturated:
            return "saturated"
        ratio = f"x{current.level / baseline.level:.3g}"
        return f"{ratio}, saturated" if current.saturated else ratio


@dataclass(frozen=True)
class AbsoluteGrowth(Numeric):
    """Fails when ``current - baseline > tolerance``: fractions, compared in absolute terms."""

    tolerance: float = 0.01

    def fails(self, current: Any, baseline: Any) -> str | None:
        if current is None or baseline is None:
            return None
        if current - baseline <= self.tolerance:
            return None
        return (
            f"{self.figure} {current:.4g} grew by {current - baseline:.4g} over the baseline's "
            f"{baseline:.4g} (tolerance {self.tolerance:g})"
        )

    def improves(self, current: Any, baseline: Any) -> bool:
        if current is None or baseline is None:
            return False
        return baseline - current > self.tolerance

    def change(self, current: Any, baseline: Any) -> str:
        if current is not None and baseline is not None:
            return f"{current - baseline:+.4g}"
        return super().change(current, baseline)


@dataclass(frozen=True)
class UntilBroken(Check):
    """A figure that chaos sets once a run breaks: compared only where neither run broke."""

    def applies(self, current_run: dict[str, Any], baseline_run: dict[str, Any]) -> str | None:
        return _broke_text(current_run, baseline_run)


@dataclass(frozen=True)
class EventsNoneWhereNone(UntilBroken, NoneWhereNone):
    """NaN / Inf steps where the baseline had none, in runs that did not break."""


@dataclass(frozen=True)
class Condition(UntilBroken, ConditionGrowth):
    """``max_condition``, saturating, in runs that did not break."""


@dataclass(frozen=True)
class Underflow(UntilBroken, AbsoluteGrowth):
    """``underflow_fraction``, in runs that did not break."""


@dataclass(frozen=True)
class LossAtMost(UntilBroken, AtMost):
    """``final_loss`` may rise by at most ``tolerance |baseline|``."""


@dataclass(frozen=True)
class AccuracyAtLeast(UntilBroken, AtLeast):
    """``accuracy`` may fall by at most ``tolerance * baseline``."""


# Checks that several seeds of one configuration replace by ``stability.seeds_broken``.
JUDGED_ACROSS_SEEDS = ("diverged", "error")


def fisher_exact_greater(broke_now: int, seeds_now: int, broke_before: int, seeds_before: int):
    """One-sided Fisher exact test: does the current run break more often than the baseline?

    Of the ``broke_now + broke_before`` broken seeds, under the null hypothesis (the same
    chance of breaking in both) the number falling among the ``seeds_now`` current ones is
    hypergeometric; the p-value is the probability of ``broke_now`` or more.

    Returns:
        The p-value, in (0, 1].
    """
    broken, seeds = broke_now + broke_before, seeds_now + seeds_before
    top = min(broken, seeds_now)
    ways = sum(
        math.comb(broken, k) * math.comb(seeds - broken, seeds_now - k)
        for k in range(broke_now, top + 1)
    )
    return ways / math.comb(seeds, seeds_now)


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
        condition_factor: allowed growth factor of the largest condition number, below
            its saturation ceiling.
        nonfinite: allowed relative advance of the first non-finite step.
        underflow: allowed absolute growth of the underflow fraction.
        loss: allowed relative rise of the final loss and fall of the accuracy.
        alpha: significance level of ``stability.seeds_broken`` (several seeds).
        max_slowdown: geometric-mean step-time ratio above which ``--against`` fails;
            None: step times are reported, never gated.
    """

    memory: float = 0.0
    peak: float = 0.10
    peak_floor: float | None = None
    tensor_peak: float = 0.05
    condition_factor: float = 10.0
    nonfinite: float = 0.20
    underflow: float = 0.01
    loss: float = 0.05
    alpha: float = 0.01
    max_slowdown: float | None = None

    def for_device(self, device: str | None) -> Tolerances:
        """These thresholds with the peak floor set for the baseline's device if unset."""
        if self.peak_floor is not None:
            return self
        return replace(self, peak_floor=default_peak_floor(device))

    def checks(self) -> list[Check]:
        """The per-run checks these thresholds define, in the order tables list them."""
        floor = default_peak_floor(None) if self.peak_floor is None else self.peak_floor
        return [
            Bytes("memory", "optimizer_state_bytes", tolerance=self.memory),
            Bytes("memory", "peak_memory_bytes", tolerance=self.peak, floor=floor),
            Bytes("memory", "peak_tensor_bytes", tolerance=self.tensor_peak, floor=TENSOR_FLOOR),
            NoneWhereNone("stability", "diverged"),
            NoneWhereNone("stability", "error"),
            EventsNoneWhereNone("stability", "nan_events"),
            EventsNoneWhereNone("stability", "inf_events"),
            NotEarlier("stability", "first_nonfinite_step", tolerance=self.nonfinite),
            Condition("stability", "max_condition", factor=self.condition_factor),
            Underflow("stability", "underflow_fraction", tolerance=self.underflow),
            LossAtMost("learning", "final_loss", tolerance=self.loss),
            AccuracyAtLeast("learning", "accuracy", tolerance=self.loss),
        ]


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
    """Run one check on one matched pair of runs.

    Raises:
        IncomparableError: the check cannot compare these runs' figures.
    """
    common = {"check": check.name, "run": key.label, "key": key.as_dict()}
    common |= {"baseline": baseline_run.get(check.figure), "current": current_run.get(check.figure)}
    reason = check.applies(current_run, baseline_run)
    if reason is not None:
        return Verdict(**common, status=SKIP, message=reason)
    current, baseline = check.values(current_run, baseline_run)
    change = check.change(current, baseline)
    message = check.fails(current, baseline)
    if message is not None:
        return Verdict(**common, status=FAIL, change=change, message=f"{key.label}: {message}")
    status = BETTER if check.improves(current, baseline) else OK
    return Verdict(**common, status=status, change=change)


def judge_seeds(label: str, base_runs: list[dict], runs: list[dict], alpha: float) -> Verdict:
    """``stability.seeds_broken`` of one configuration: fails when the current run breaks
    in significantly more seeds than the baseline (``fisher_exact_greater`` < ``alpha``);
    ``better`` when significantly fewer."""
    was = sum(bool(broke(run)) for run in base_runs)
    now = sum(bool(broke(run)) for run in runs)
    p_worse = fisher_exact_greater(now, len(runs), was, len(base_runs))
    p_better = fisher_exact_greater(
        len(runs) - now, len(runs), len(base_runs) - was, len(base_runs)
    )
    common = {"check": "stability.seeds_broken", "run": label, "key": None}
    common |= {"baseline": f"{was}/{len(base_runs)}", "current": f"{now}/{len(runs)}"}
    common |= {"change": f"p={p_worse:.3g}", "p_value": p_worse}
    if p_worse < alpha:
        message = (
            f"{label}: broke in {now} of {len(runs)} seeds against {was} of {len(base_runs)} "
            f"in the baseline (one-sided Fisher exact test p = {p_worse:.3g} < alpha {alpha:g})"
        )
        return Verdict(**common, status=FAIL, message=message)
    return Verdict(**common, status=BETTER if p_better < alpha else OK)


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
    seeds = configurations(baseline.runs)
    for key, base_run in baseline.runs.items():
        run = current.runs.get(key)
        across_seeds = len(seeds[key.config]) > 1
        if run is None:
            missing = f"{key.label}: run is in the baseline but missing from {current.source}"
            verdicts.append(_coverage(key, FAIL, missing))
        elif broke(run) is None and broke(base_run) is not None:
            unfinished = f"{key.label}: run did not finish in {current.source} (no result)"
            verdicts.append(_coverage(key, FAIL, unfinished))
        else:
            for check in checks:
                if across_seeds and check.figure in JUDGED_ACROSS_SEEDS:
                    continue
                try:
                    verdicts.append(judge(check, key, run, base_run))
                except IncomparableError as why:
                    raise UsageError(
                        f"The gate cannot compare run {key.label} of {current.source} with "
                        f"baseline {baseline.source}: {why}."
                    ) from None
    for keys in seeds.values():
        if len(keys) > 1:
            results = [current.runs[k] for k in keys if broke(current.runs.get(k, {})) is not None]
            base_runs = [baseline.runs[k] for k in keys]
            if results:
                verdicts.append(
                    judge_seeds(keys[0].config_label, base_runs, results, tolerances.alpha)
                )
    for key in current.runs.keys() - baseline.runs.keys():
        verdicts.append(_coverage(key, NEW, "not in the baseline: refresh it to gate this run"))
    verdicts.extend(judge_frontiers(current, baseline, tolerances.alpha))
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


def parse_probability(text: str | float, option: str) -> float:
    """A significance level in (0, 1): ``"0.01"`` or ``"1%"``."""
    try:
        value = parse_fraction(text, option)
    except UsageError:
        value = math.nan
    if not 0 < value < 1:
        raise UsageError(
            f"{option} must be a probability between 0 and 1 such as 0.01, not {text!r}."
        )
    return value


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
