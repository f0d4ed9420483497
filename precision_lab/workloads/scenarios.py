"""Scenarios: a suite's names for conditions (`precision_lab.workloads.knobs.Condition`).

A scenario is either ``baseline`` (nothing changed: the reference every frontier starts
from) or one rung of a knob, ``<knob>=<value>`` (``damping=1e-08``, ``input_scale=16384``):
a single point where a suite wants no whole ladder. Frontiers (docs/suites.md) sweep a
knob's rungs instead; their runs carry the same scenario names.

The former single-point scenarios are rungs now, named by the error that meets their old
names: ``near_fp16_max`` is ``input_scale=16384`` (a quarter of float16's largest finite
value 65,504), ``gradient_underflow`` is ``loss_scale=6.10352e-05`` (2**-14, float16's
smallest normal number), ``tiny_damping`` is ``damping=1e-08`` and ``large_lr_cov`` is
``lr_cov=0.5``. ``ill_conditioned`` changed the dataset, not the batches: a condition
applies to any workload's batches, a dataset is a workload's own (synthetic data spanning
four decades stays in `precision_lab.workloads.data.synthetic`).
"""

from __future__ import annotations

from precision_lab.workloads.knobs import BASELINE, KNOBS, Condition, get_knob

RETIRED: dict[str, str] = {
    "near_fp16_max": "input_scale=16384",
    "gradient_underflow": f"loss_scale={format(2.0**-14, 'g')}",
    "tiny_damping": "damping=1e-08",
    "large_lr_cov": "lr_cov=0.5",
}
"""The former single-point scenarios and the rungs that replace them."""


def get_scenario(name: str) -> Condition:
    """The condition of the scenario ``name``: ``baseline`` or ``<knob>=<value>``.

    Raises:
        ValueError: An unknown name, a former scenario, an unknown knob or a bad value,
            in one sentence that says what to write instead.
    """
    if name == BASELINE.name:
        return BASELINE
    if name in RETIRED:
        knob = RETIRED[name].partition("=")[0]
        raise ValueError(
            f"Scenario {name!r} is now the rung {RETIRED[name]} of the {knob} frontier: "
            f"name that rung in --scenarios, or the whole ladder with --scenarios {knob} "
            "(docs/suites.md, [[frontier]])."
        )
    if name == "ill_conditioned":
        raise ValueError(
            "Scenario 'ill_conditioned' is gone: it changed the dataset, which is a "
            "workload's own, not a condition on its batches; sweep a knob instead "
            "(a [[frontier]] table, docs/suites.md)."
        )
    if "=" not in name:
        knob = " or a knob's name to select its frontiers" if name in KNOBS else ""
        raise ValueError(
            f"Unknown scenario {name!r}; expected baseline or a rung <knob>=<value> with a "
            f"knob among {', '.join(KNOBS)}{knob} (docs/suites.md)."
        )
    return _rung(name)


def _rung(name: str) -> Condition:
    knob_name, _, text = name.partition("=")
    knob = get_knob(knob_name.strip())
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"Scenario {name!r} has no number after '='; write e.g. {knob.label(1e-3)}."
        ) from None
    return knob.condition(value)


def rung(name: str) -> tuple[str, float] | None:
    """``(knob, value)`` of a rung's scenario name; None for ``baseline``."""
    if name == BASELINE.name:
        return None
    knob, _, text = name.partition("=")
    return knob, float(text)
