"""The summary's vocabulary, defined once: every field of a run object, what each may hold,
and when a run *broke*.

The writer (`precision_lab.run.directory`), the runner, the baseline, the gate and the
report all take their field names, checks and the definition of a broken run from here.
A run object is a plain dict with the keys of `FIELDS` (summary.json's ``runs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from precision_lab.errors import UsageError
from precision_lab.workloads.workload import chance_accuracy

MEMORY_STEPS = 3
"""``peak_tensor_bytes`` covers the optimizer's construction and this many first steps
(`precision_lab.run.runner`): the state is made there, and later steps repeat the same
allocations (counting costs a Python call per operation on the CPU, so not the whole
run; one quick-suite KFAC run peaked in its third step)."""

FIELDS: dict[str, str] = {
    "run": "the run's id: model/scenario/optimizer/dtype/mode/s<seed>[/control-<dtype>-<mode>]",
    "model": "mlp, cnn or transformer",
    "scenario": "the scenario's name: baseline, or a rung <knob>=<value> (docs/suites.md)",
    "frontier": "for a frontier rung, the knob's name (damping, input_scale, loss_scale, "
    "lr_cov); null for baseline",
    "knob_value": "for a frontier rung, the knob's value; null for baseline",
    "optimizer": "the optimizer's canonical spec string",
    "structure": "SINGD's structure, K or K/C; dense for KFAC; null for AdamW and SGD",
    "dtype": "the run's dtype, torch name",
    "mode": "pure: model and optimizer state in the dtype; mixed: float32 master weights, "
    "autocast, GradScaler for float16",
    "seed": "seed of the weights and of the batch order",
    "control_of": "for a float32 control, the id of the run it controls; else null",
    "steps": "optimizer steps taken (fewer than planned when the run diverged or stopped)",
    "finished": "the run ran to its end or to its divergence",
    "diverged": "the loss became non-finite or exceeded 10x its first value (the run stops)",
    "first_nonfinite_step": "first step with a NaN/Inf loss or watched tensor; null if none",
    "nan_events": "steps with any NaN in a watched tensor, skipped steps excluded",
    "inf_events": "steps with any Inf in a watched tensor, skipped steps excluded",
    "skipped_steps": "steps skipped on infinite gradients (GradScaler or the optimizer)",
    "overflow_events": "steps with a finite watched value above half the dtype's maximum (or "
    "one that would overflow when cast to the run's dtype), skipped steps excluded",
    "underflow_fraction": "largest fraction, over watched tensors, of nonzero values that are "
    "subnormal or flush to zero in the dtype",
    "max_condition": "largest condition number of any preconditioner factor seen; null "
    "without factors",
    "optimizer_state_bytes": "bytes of optimizer state at the end, fallback optimizer included (B)",
    "peak_memory_bytes": "CUDA allocator peak, or the process's resident-memory high-water "
    "mark, reset per run (B)",
    "peak_tensor_bytes": "peak of live tensor bytes above the model's own (its parameters, "
    f"buffers and data) from the optimizer's construction through the first {MEMORY_STEPS} "
    "steps: state, "
    "gradients, activations and temporaries, comparable between optimizers and dtypes (B; "
    "CUDA: the allocator's peak; CPU: counted per operation, `probes.tensor_memory`); null "
    "when the run ended before those steps",
    "final_loss": "training loss of the last step taken (nats)",
    "accuracy": "the workload's metric at the end, in [0, 1], higher better: test accuracy "
    "for the digits models; null for synthetic data and workloads without a metric",
    "metric_name": "what accuracy holds: test_accuracy (the digits), answer_accuracy (the "
    "language model), or the name of a user workload's metric; null without one",
    "learned": "the run learned: its loss fell by 10% from its first step's and, where it has "
    "a test accuracy, that accuracy beat chance by 3 standard errors (`learned`); false for "
    "a run that diverged; null when it crashed or is unfinished",
    "step_time_ms": "median wall-clock time of a training step, probes included (ms)",
    "failure_cause": "none, precision (the run broke, its float32 control held and learned), "
    "no_learning (the run broke, its control held but did not learn: the setting says "
    "nothing about the dtype) or optimization (the control broke too, or a float32 run "
    "broke); a run broke when it diverged or crashed; null while it or its control is "
    "unfinished or the control's learned is unknown",
    "fallback_optimizer": "optimizer of the parameters no Kronecker factor covers; null for "
    "AdamW and SGD",
    "preconditioned_fraction": "fraction of the model's parameter elements that the Kronecker "
    "factors precondition (`singd.optim.coverage.Coverage.fraction`, final after the first "
    "step); null for AdamW and SGD, which have none",
    "coverage": "where the parameters go, by layer type: preconditioned / fallback / untrained "
    "tensor and element counts and the preconditioned fraction "
    "(`singd.optim.coverage.Coverage.as_dict`); null for AdamW and SGD",
    "precision_events": 'precision="auto" (a +auto spec): how many factors changed dtype '
    "(`singd.optim.precision`); null for any other optimizer",
    "promoted_fraction": 'precision="auto": fraction of the optimizer\'s factors held in a '
    "wider dtype than they started in, at the end; null otherwise",
    "promoted_bytes": 'precision="auto": bytes the promoted factors hold beyond their '
    "starting dtype's, at the end (B); null otherwise",
    "control": "the float32 control's figures beside this run's; null for a float32 run",
    "seeds_broken": "over the seeds of this configuration, how many broke",
    "seeds_total": "how many seeds of this configuration the suite plans",
    "error": "for a run that crashed, '<exception type>: <message>'; else null",
    "warnings": "distinct warnings raised while the run was built and trained",
    "hyperparameters": "the optimizer's hyperparameters as built (family defaults, then the "
    "suite's and the scenario's overrides)",
}
"""Every run object's keys in the order written, with their definitions (DESIGN.md's for
the fields it names); summary.json carries them under ``fields``."""

SUMMARY_FIELDS = tuple(FIELDS)

KEY_FIELDS = ("model", "scenario", "optimizer", "dtype", "mode", "seed")
"""The coordinates that identify a run across run directories (with its role as a
control: `precision_lab.gate.baseline.RunKey`)."""

FIGURES = tuple(
    name
    for name in FIELDS
    if name
    not in (
        "run",
        *KEY_FIELDS,
        "frontier",
        "knob_value",
        "control_of",
        "warnings",
        "learned",
        "preconditioned_fraction",
        "coverage",
        "metric_name",
        "precision_events",
        "promoted_fraction",
        "promoted_bytes",
    )
)
"""What a run measured or how it was set up, apart from its id and key: what a baseline
keeps for each run. ``learned`` is not among them: it is a verdict on ``final_loss`` and
``accuracy``, which the gate checks, and baselines written before it existed stay
readable. Nor are ``frontier`` and ``knob_value``: the scenario, in the key, names them.
Nor are ``preconditioned_fraction`` and ``coverage``: how the optimizer split the
parameters is set by the model and the optimizer, both in the key, and baselines written
before they existed stay readable. Nor are ``metric_name`` (the model, in the key, sets
it) and the escalation figures (``precision_events``, ``promoted_fraction``,
``promoted_bytes``): baselines written before them stay readable."""

CONTROL_FIELDS = (
    "run",
    "finished",
    "diverged",
    "first_nonfinite_step",
    "nan_events",
    "inf_events",
    "max_condition",
    "final_loss",
    "accuracy",
    "learned",
    "error",
)
"""The control's figures copied beside each low-precision run."""

FAILURE_CAUSES = ("none", "precision", "no_learning", "optimization")


def broke(run: dict[str, Any]) -> bool | None:
    """Whether a run broke: it diverged or raised (DESIGN.md; the one definition that the
    summary, the report and the gate use). None while it is unfinished and did neither."""
    if run.get("diverged") or run.get("error"):
        return True
    return False if run.get("finished") else None


LOSS_FALL = 0.10
"""How far, relative to the first step's loss, the final loss must fall for a run to have
learned (`learned`)."""


def learned(
    *,
    first_loss: float | None,
    final_loss: float | None,
    accuracy: float | None = None,
    classes: int | None = None,
    test_size: int | None = None,
    chance: float | None = None,
    diverged: bool = False,
    finished: bool = True,
) -> bool | None:
    """Whether a run learned (DESIGN.md's ``learned``; the one definition, recorded per run
    in summary.json and read by `failure_cause`).

    A run learned when both hold:

    - its final training loss is below its first step's by at least `LOSS_FALL` (10%) of
      the first. Both are the loss of one minibatch: at initialization the per-example
      cross-entropies of a 64-example batch spread by a few percent of their mean, so a
      10% fall is not noise, while any run that learned the digits ends far lower (the
      quick suite's float32 baseline controls: 2.3 to 0.2-0.6);
    - where the workload has labels and a test accuracy (``accuracy`` not None), the
      accuracy exceeds `chance_accuracy`: chance (1 / classes) plus 3 binomial standard
      errors for the test set's size (one-sided p ~ 0.001 that a guesser gets there).
      Synthetic data has no accuracy: the loss alone decides.

    A run that diverged did not learn (it stopped on a loss that grew); one that crashed,
    is unfinished, or has no finite first loss is unknown (None). A non-finite final loss
    did not learn.

    Args:
        first_loss: The first step's training loss.
        final_loss: The last step's training loss.
        accuracy: Test accuracy in [0, 1], or None where the workload has none.
        classes: Number of classes (needed with ``accuracy``).
        test_size: Number of test examples (needed with ``accuracy``).
        chance: The accuracy to beat, given instead of ``classes`` and ``test_size`` (a
            workload's ``chance``, `precision_lab.workloads.workload.Workload`).
        diverged: The run diverged.
        finished: The run ran to its end or its divergence (False: crashed or cut off).
    """
    if diverged:
        return False
    if not finished or first_loss is None or not math.isfinite(first_loss):
        return None
    if final_loss is None or not math.isfinite(final_loss):
        return False
    if final_loss > first_loss - LOSS_FALL * abs(first_loss):
        return False
    if accuracy is None:
        return True
    if chance is None:
        if classes is None or test_size is None:
            raise ValueError("learned: an accuracy needs its chance or classes and test size")
        chance = chance_accuracy(classes, test_size)
    return accuracy > chance


def failure_cause(run: dict[str, Any], control: dict[str, Any] | None) -> str | None:
    """``none``, ``precision``, ``no_learning`` or ``optimization`` (`FIELDS`); None when
    unknown.

    A broken run is charged to ``precision`` only when its float32 control held and
    learned: a control that held without learning (below-chance accuracy, a flat loss)
    says nothing about the dtype, so the run is ``no_learning``.
    """
    run_broke = broke(run)
    if run_broke is None or not run_broke:
        return None if run_broke is None else "none"
    if control is None:
        return "optimization"
    control_broke = broke(control)
    if control_broke is None:
        return None
    if control_broke:
        return "optimization"
    control_learned = control.get("learned")
    if control_learned is None:
        return None
    return "precision" if control_learned else "no_learning"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


Rule = tuple[Callable[[Any], bool], str]
_TEXT: Rule = (lambda v: isinstance(v, str), "a string")
_COUNT: Rule = (_count, "a non-negative integer")
_FRACTION: Rule = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
_SIZE: Rule = (lambda v: _number(v) and v >= 0, "a non-negative number")
_OBJECT: Rule = (lambda v: isinstance(v, dict), "an object")

FIGURE_RULES: dict[str, Rule] = {
    **dict.fromkeys(("model", "scenario", "optimizer", "structure", "dtype", "mode"), _TEXT),
    **dict.fromkeys(
        ("control_of", "error", "fallback_optimizer", "role", "frontier", "metric_name"), _TEXT
    ),
    "knob_value": (lambda v: _number(v) and v > 0, "a positive number"),
    **dict.fromkeys(
        ("finished", "diverged", "learned"), (lambda v: isinstance(v, bool), "true or false")
    ),
    **dict.fromkeys(
        (
            "seed",
            "steps",
            "first_nonfinite_step",
            "nan_events",
            "inf_events",
            "skipped_steps",
            "overflow_events",
            "seeds_broken",
            "seeds_total",
            "precision_events",
            "promoted_bytes",
        ),
        _COUNT,
    ),
    **dict.fromkeys(
        ("underflow_fraction", "accuracy", "preconditioned_fraction", "promoted_fraction"),
        _FRACTION,
    ),
    **dict.fromkeys(
        ("optimizer_state_bytes", "peak_memory_bytes", "peak_tensor_bytes", "step_time_ms"), _SIZE
    ),
    "max_condition": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "final_loss": (_number, "a number"),
    "failure_cause": (lambda v: v in FAILURE_CAUSES, f"one of {', '.join(FAILURE_CAUSES)}"),
    **dict.fromkeys(("control", "hyperparameters", "coverage"), _OBJECT),
    "warnings": (lambda v: isinstance(v, list), "a list"),
}
"""What each field of a run object (and ``role``, a baseline key's) may hold besides
null, as a test and in words: one check for summary.json, run directories and baselines."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_run(
    run: dict[str, Any],
    label: str,
    where: str,
    *,
    key_fields: Iterable[str] = (),
    complete: Iterable[str] = (),
) -> None:
    """Refuse a run object whose fields do not have their types and ranges (`FIGURE_RULES`).

    Args:
        run: A run object (or a baseline's key or figures).
        label: How the message names the run.
        where: The file, for the message.
        key_fields: Fields that may not be null.
        complete: Fields that must be present (null allowed).

    Raises:
        UsageError: In one sentence naming the file, the run, the first bad field, its
            value and what is allowed.
    """
    for name in complete:
        if name not in run:
            raise UsageError(f"{where}: run {label} lacks the figure {name}.")
    required = set(key_fields)
    for name, (test, allowed) in FIGURE_RULES.items():
        value = run.get(name)
        if value is None and name not in required:
            continue
        if not test(value):
            null = "" if name in required else " or null"
            raise UsageError(
                f"{where}: run {label} has {name} = {_shown(value)}, but {name} must be "
                f"{allowed}{null}."
            )


def check_runs(runs: Any, where: str) -> None:
    """Every run an object with a non-empty ``run`` id and fields of `FIGURE_RULES`."""
    if not isinstance(runs, list):
        raise UsageError(f"{where} holds no list of run objects under 'runs'.")
    for i, run in enumerate(runs, 1):
        if not isinstance(run, dict):
            raise UsageError(
                f"{where}: run {i} is a {type(run).__name__}, but every run must be an object."
            )
        name = run.get("run")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: run {i} has run = {name!r}, but its id must be a string.")
        check_run(run, repr(name), where)
