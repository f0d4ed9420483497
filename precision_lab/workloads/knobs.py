"""Knobs and conditions: the ways a stress run is made harder, one number at a time.

A `Condition` is everything a scenario or a frontier rung changes in a run, and nothing
else, so a run and its float32 control differ only in their dtype:

- ``input_max``: the floating input tensors of every batch (training and test alike) are
  multiplied by one factor, ``input_max / max |x|`` over the training inputs, so that the
  largest absolute training input equals ``input_max`` (`Condition.input_factor`,
  `Condition.scale_inputs`);
- ``loss_multiplier``: the loss is multiplied by it before backpropagation;
- hyperparameter overrides per optimizer family (`Condition.overrides`); None for a family
  the condition does not apply to (`Condition.skip_reason` says why), and the run is
  skipped: it would repeat the baseline.

A `Knob` turns a number into a condition and knows which way is harsher, so that a suite
can declare a *frontier*: a ladder of values from mild to harsh (docs/suites.md).

Why ``loss_scale`` divides the learning rate of SINGD, KFAC and SGD but not AdamW's: with
the loss multiplied by ``s`` every gradient is multiplied by ``s``. SGD's step is
``lr * g``: it shrinks by ``s``. KFAC's and SINGD's steps are ``lr * P g`` where the
preconditioner ``P`` comes from the damped gradient factor ``G + lambda I`` (KFAC's
inverse, SINGD's ``C C^T``); ``G`` is a second moment of the layer's output gradients,
so it scales by ``s**2`` and, below ``s ~ 1`` on this project's models, ``s**2 G`` falls
far below the damping (1e-3), leaving ``P ~ A^-1 / lambda`` independent of ``s``: the
step shrinks by ``s`` too (SINGD's ``C`` moreover starts at the identity and moves by
``lr_cov`` per step). Dividing ``lr`` by ``s`` restores the float32 step, so float32 learns
at every rung and only the dtype's range is stressed. AdamW's step
``lr * m / (sqrt(v) + eps)`` is a ratio of the gradient to its own root mean square: ``s``
cancels (until ``s |g|`` nears ``eps = 1e-8``), so its learning rate stays.
Measured on the MLP (float32, 40 steps, final training loss; first loss 2.3): without
the division SINGD, KFAC and SGD stay untrained at every s <= 2**-4 (2.10-2.33); with it
SGD gives 1.962 at every s (bit for bit: powers of two), SINGD 0.237 at every s <= 2**-4
(0.246 at s = 1) and KFAC 0.122-0.123 (0.211 at s = 1, where ``G`` still outweighs the
damping); AdamW, undivided, 0.023-0.047 from s = 1 to 2**-14.
tests/precision_lab/run/test_conditions.py checks the same on 15 steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from precision_lab.workloads.workload import map_floating

FLOAT16_MAX = 65_504.0
KRONECKER_FAMILIES = ("singd", "kfac")
ALL_FAMILIES = ("singd", "kfac", "adamw", "sgd")
SCALE_DEPENDENT_FAMILIES = ("singd", "kfac", "sgd")
"""Families whose step is proportional to the gradient's scale (module docstring)."""


@dataclass(frozen=True)
class Condition:
    """What a scenario or a frontier rung changes in a run (the module docstring).

    Attributes:
        name: The scenario's name in run ids: ``baseline`` or ``<knob>=<value>``.
        input_max: The largest absolute training input after scaling; None: unscaled.
        loss_multiplier: Multiplies the loss before backpropagation.
        hyperparameters: Per optimizer family, the hyperparameters set (``lr`` as a
            multiplier is in ``lr_multiplier``); a family absent gets none; a family
            mapped to None is not applicable.
        lr_multiplier: Per family, a factor on the learning rate the suite sets.
        not_applicable: Why the condition skips the families mapped to None.
    """

    name: str = "baseline"
    input_max: float | None = None
    loss_multiplier: float = 1.0
    hyperparameters: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    lr_multiplier: Mapping[str, float] = field(default_factory=dict)
    not_applicable: str = ""

    def overrides(self, family: str) -> dict[str, Any] | None:
        """Hyperparameters this condition sets for ``family``; None: not applicable."""
        if family in self.hyperparameters and self.hyperparameters[family] is None:
            return None
        return dict(self.hyperparameters.get(family) or {})

    def skip_reason(self, family: str) -> str | None:
        """Why runs of ``family`` are skipped under this condition; None when they run."""
        if self.overrides(family) is not None:
            return None
        return f"{self.name} does not apply to {family}: {self.not_applicable}"

    def input_factor(self, max_abs: float) -> float:
        """The factor on every floating input, given the training inputs' max ``|x|``."""
        if self.input_max is None:
            return 1.0
        if not max_abs > 0 or not math.isfinite(max_abs):
            raise ValueError(f"inputs cannot be scaled to a maximum: their max |x| is {max_abs}")
        return self.input_max / max_abs

    @staticmethod
    def scale_inputs(inputs: Any, factor: float) -> Any:
        """``inputs`` with every floating tensor multiplied by ``factor`` (in float32 or
        wider, before any cast to the run's dtype); other tensors (labels, token ids) and
        non-tensors unchanged. Walks tuples (named ones too), lists and dicts."""
        if factor == 1.0:
            return inputs
        return map_floating(inputs, lambda t: t * factor)


BASELINE = Condition()


@dataclass(frozen=True)
class Knob:
    """A number that makes training harder, swept along a ladder (`Knob.condition`).

    Attributes:
        name: ``damping``, ``input_scale``, ``loss_scale`` or ``lr_cov``.
        harsher: ``down`` when smaller values are harsher, ``up`` when larger ones are.
        families: The optimizer families the knob applies to.
        doc: One line for tables and errors.
    """

    name: str
    harsher: str
    families: tuple[str, ...]
    doc: str

    NOT_APPLICABLE: ClassVar[dict[str, str]] = {
        "damping": "it has no damping",
        "lr_cov": "only SINGD has a preconditioner step size",
    }

    def label(self, value: float) -> str:
        """The rung's scenario name: ``damping=1e-06`` (``format(value, "g")``)."""
        return f"{self.name}={format(value, 'g')}"

    def applies_to(self, family: str) -> bool:
        return family in self.families

    def mildest_first(self, values: list[float]) -> list[float]:
        """``values`` ordered from the mildest to the harshest."""
        return sorted(values, reverse=self.harsher == "down")

    def condition(self, value: float) -> Condition:
        """The condition of the rung ``value``.

        Raises:
            ValueError: A value that is not a positive finite number.
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.name} must be a number, got {value!r}.")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{self.name} must be a positive finite number, got {value!r}.")
        value = float(value)
        skipped = {f: None for f in ALL_FAMILIES if f not in self.families}
        reason = self.NOT_APPLICABLE.get(self.name, "")
        name = self.label(value)
        if self.name == "input_scale":
            return Condition(name, input_max=value)
        if self.name == "loss_scale":
            return Condition(
                name,
                loss_multiplier=value,
                lr_multiplier={f: 1.0 / value for f in SCALE_DEPENDENT_FAMILIES},
            )
        table = {f: {self.name: value} for f in self.families}
        return Condition(name, hyperparameters={**table, **skipped}, not_applicable=reason)


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        Knob(
            "damping",
            "down",
            KRONECKER_FAMILIES,
            "damping lambda of SINGD, IKFAC and KFAC (smaller is harsher)",
        ),
        Knob(
            "input_scale",
            "up",
            ALL_FAMILIES,
            "inputs scaled so that the largest training |x| equals the value (larger is harsher)",
        ),
        Knob(
            "loss_scale",
            "down",
            ALL_FAMILIES,
            "loss multiplied by the value, the learning rate of SINGD, KFAC and SGD divided by "
            "it (smaller is harsher)",
        ),
        Knob(
            "lr_cov",
            "up",
            ("singd",),
            "SINGD's preconditioner step size beta1 (larger is harsher)",
        ),
    )
}


def get_knob(name: str) -> Knob:
    """The knob called ``name``.

    Raises:
        ValueError: An unknown name, in one sentence listing the known ones.
    """
    if name not in KNOBS:
        raise ValueError(f"Unknown knob {name!r}; expected one of {', '.join(KNOBS)}.")
    return KNOBS[name]
