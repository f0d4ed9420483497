"""Suites as data: TOML files naming models x scenarios x optimizers x dtypes x seeds.

A suite is read with the standard library's tomllib, validated with one-sentence errors
(unknown key, model, scenario, optimizer spec, dtype, mode or hyperparameter), and
expanded into an ordered list of `RunPlan` s. The schema is documented in docs/suites.md;
the built-in suites ``quick``, ``default`` and ``full`` live beside this module.

Every run in a low-precision dtype is preceded by its float32 control: same model, data,
seed and hyperparameters, pure float32. A control has its own run id,
``<model>/<scenario>/<optimizer>/float32/pure/s<seed>/control-<dtype>-<mode>``, and names
the run it controls in ``control_of``.
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from precision_lab.dtypes import dtype_name, parse_dtype
from precision_lab.errors import UsageError
from precision_lab.specs import OptimizerSpec, parse_spec
from precision_lab.workloads.knobs import KNOBS, Condition, get_knob
from precision_lab.workloads.models import MODELS, build_model
from precision_lab.workloads.scenarios import get_scenario, rung

BUILTIN_SUITES = ("quick", "default", "full")
MODES = ("pure", "mixed")
TOP_KEYS = {
    "name",
    "description",
    "models",
    "scenarios",
    "optimizers",
    "matrix",
    "dtypes",
    "modes",
    "seeds",
    "steps",
    "batch_size",
    "every",
    "hyperparameters",
    "frontier",
}
MATRIX_KEYS = {"models", "scenarios", "optimizers"}
FRONTIER_KEYS = {"models", "knob", "ladder", "optimizers"}
MAX_SEED = 2**32 - 1
"""Largest seed accepted (the common 32-bit range; torch's generators stop at 2**64 - 1)."""
FILE_LOCATIONS = {"failure_dir"}
"""Hyperparameters that name a place to write: set by the command line, never by a suite,
so that a suite file cannot write outside its run directory."""


@dataclass(frozen=True)
class RunPlan:
    """One training run of a suite, fully specified.

    Attributes:
        spec: The optimizer, parsed once when the suite is planned.
        hyperparameters: The overrides passed to ``OptimizerSpec.build``: the suite's
            family table, then its spec table, then the scenario's, later ones winning.
        control_for: For a float32 control, the dtype and mode of the run it controls.
        frontier: For a frontier rung (or a scenario naming one), the knob; else None.
        knob_value: The rung's value (exact; ``scenario`` shows it rounded); else None.
    """

    model: str
    scenario: str
    spec: OptimizerSpec
    dtype: torch.dtype
    mode: str
    seed: int
    steps: int
    batch_size: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    control_for: tuple[torch.dtype, str] | None = None
    frontier: str | None = None
    knob_value: float | None = None

    @property
    def condition(self) -> Condition:
        """What this run changes (`precision_lab.workloads.knobs.Condition`): its input
        scale, loss multiplier and overrides (already merged into ``hyperparameters``)."""
        if self.frontier is None:
            return get_scenario(self.scenario)
        return get_knob(self.frontier).condition(self.knob_value)

    @property
    def optimizer(self) -> str:
        """The optimizer's canonical spec string, as the run's id and summary name it."""
        return self.spec.text

    @property
    def family(self) -> str:
        """The optimizer's family: ``singd``, ``kfac``, ``adamw`` or ``sgd``."""
        return self.spec.family

    def _label(self, seed: str) -> str:
        base = (
            f"{self.model}/{self.scenario}/{self.optimizer}/{dtype_name(self.dtype)}"
            f"/{self.mode}/s{seed}"
        )
        if self.control_for is None:
            return base
        dtype, mode = self.control_for
        return f"{base}/control-{dtype_name(dtype)}-{mode}"

    @property
    def run_id(self) -> str:
        """Unique and readable: ``mlp/ill_conditioned/singd:diagonal/bfloat16/pure/s0``."""
        return self._label(str(self.seed))

    @property
    def config_key(self) -> str:
        """The run's id with ``s*`` for its seed: what the seeds of one configuration share."""
        return self._label("*")

    @property
    def coordinates(self) -> dict[str, Any]:
        """The run object's fields that the plan fixes (`precision_lab.run.summary.FIELDS`):
        its id, key, structure and control."""
        return {
            "run": self.run_id,
            "model": self.model,
            "scenario": self.scenario,
            "frontier": self.frontier,
            "knob_value": self.knob_value,
            "optimizer": self.optimizer,
            "structure": self.spec.structure,
            "dtype": dtype_name(self.dtype),
            "mode": self.mode,
            "seed": self.seed,
            "control_of": self.control_of,
        }

    @property
    def control_of(self) -> str | None:
        """For a float32 control, the id of the run it controls; else None."""
        if self.control_for is None:
            return None
        dtype, mode = self.control_for
        return replace(self, dtype=dtype, mode=mode, control_for=None).run_id


@dataclass(frozen=True)
class Matrix:
    """One cross product of the suite: every model x scenario x optimizer listed."""

    models: tuple[str, ...]
    scenarios: tuple[str, ...]
    optimizers: tuple[str, ...]


@dataclass(frozen=True)
class Frontier:
    """A knob swept along a ladder, mildest rung first, for every model x optimizer listed
    (the optimizers the knob does not apply to are skipped)."""

    models: tuple[str, ...]
    knob: str
    ladder: tuple[float, ...]
    optimizers: tuple[str, ...]

    def applicable(self) -> tuple[str, ...]:
        """The optimizers listed that the knob applies to."""
        knob = get_knob(self.knob)
        return tuple(o for o in self.optimizers if knob.applies_to(_parse_spec(o).family))


@dataclass(frozen=True)
class Suite:
    """A validated suite. ``source`` is the built-in name or the TOML file's path."""

    name: str
    description: str
    source: str
    text: str
    matrices: tuple[Matrix, ...]
    dtypes: tuple[torch.dtype, ...]
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    batch_size: int
    every: int
    hyperparameters: dict[str, dict[str, Any]]
    frontiers: tuple[Frontier, ...] = ()

    def choose(
        self,
        *,
        models: list[str] | None = None,
        scenarios: list[str] | None = None,
        optimizers: list[str] | None = None,
        dtypes: list[torch.dtype] | None = None,
        modes: list[str] | None = None,
        seeds: list[int] | None = None,
        steps: int | None = None,
        every: int | None = None,
    ) -> Suite:
        """This suite with the command line's choices replacing the suite's own lists.

        ``models`` and ``optimizers`` replace those of every matrix and frontier (a
        frontier left with no optimizer its knob applies to is dropped). ``scenarios``
        selects: a knob's name keeps that knob's frontiers (naming none drops them); other
        names (``baseline``, a rung ``damping=1e-08``) become the scenarios of every matrix
        and of every frontier's models and optimizers (naming none drops the matrices).
        """
        knobs = [s for s in scenarios or () if s in KNOBS]
        points = tuple(s for s in scenarios or () if s not in KNOBS)
        groups = (*self.matrices, *self.frontiers) if points else self.matrices
        matrices = tuple(
            Matrix(
                tuple(models) if models else m.models,
                points or m.scenarios,
                tuple(optimizers) if optimizers else m.optimizers,
            )
            for m in groups
            if points or not scenarios
        )
        frontiers = tuple(
            replace(
                f,
                models=tuple(models) if models else f.models,
                optimizers=tuple(optimizers) if optimizers else f.optimizers,
            )
            for f in self.frontiers
            if not scenarios or f.knob in knobs
        )
        chosen = replace(
            self,
            matrices=matrices,
            frontiers=tuple(f for f in frontiers if f.applicable()),
            dtypes=tuple(dtypes) if dtypes else self.dtypes,
            modes=tuple(modes) if modes else self.modes,
            seeds=tuple(seeds) if seeds else self.seeds,
            steps=self.steps if steps is None else steps,
            every=self.every if every is None else every,
        )
        chosen.validate()
        if not chosen.matrices and not chosen.frontiers:
            raise UsageError(
                f"Suite {self.name!r} has nothing left to run with the models, scenarios and "
                "optimizers chosen (a knob's frontier needs an optimizer the knob applies to)."
            )
        return chosen

    def validate(self) -> None:
        """Check every name and number; `UsageError` (one sentence) on the first bad one."""
        for group in (*self.matrices, *self.frontiers):
            for model in group.models:
                if model not in MODELS:
                    raise UsageError(
                        f"Suite {self.name!r} names unknown model {model!r}; "
                        f"expected one of {', '.join(MODELS)}."
                    )
            for spec in group.optimizers:
                _parse_spec(spec)
        for matrix in self.matrices:
            for scenario in matrix.scenarios:
                _wrap(get_scenario, scenario)
        for mode in self.modes:
            if mode not in MODES:
                raise UsageError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
        for label, value in (
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("every", self.every),
        ):
            if not _is_int(value) or value < 1:
                raise UsageError(f"{label} must be a positive integer, got {value!r}.")
        for seed in self.seeds:
            if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
                raise UsageError(f"Seeds must be integers from 0 to {MAX_SEED}, got {seed!r}.")

    def _points(self):
        """(model, spec, condition, knob, value) of every run configuration: the matrices'
        scenarios (knob and value set for a rung's name), then every frontier's rungs."""
        for matrix in self.matrices:
            for model in matrix.models:
                for scenario in matrix.scenarios:
                    condition = get_scenario(scenario)
                    knob, value = rung(scenario) or (None, None)
                    for spec_text in matrix.optimizers:
                        yield model, spec_text, condition, knob, value
        for frontier in self.frontiers:
            knob = get_knob(frontier.knob)
            for model in frontier.models:
                for spec_text in frontier.optimizers:
                    for value in frontier.ladder:
                        yield model, spec_text, knob.condition(value), knob.name, value

    def plan(self) -> list[RunPlan]:
        """The runs in order: for each configuration, a float32 control before each run.

        Configurations whose condition does not apply to the optimizer's family
        (`Condition.overrides` is None) are skipped; a run listed twice runs once.
        A condition's learning-rate factor (``loss_scale``) multiplies the learning rate
        the suite (or the family's default) sets.
        """
        low = [d for d in self.dtypes if d != torch.float32]
        runs: dict[str, RunPlan] = {}
        for model, spec_text, condition, knob, value in self._points():
            spec = _parse_spec(spec_text)
            extra = condition.overrides(spec.family)
            if extra is None:
                continue
            hyper = {
                **self.hyperparameters.get(spec.family, {}),
                **self.hyperparameters.get(spec_text, {}),
                **extra,
            }
            factor = condition.lr_multiplier.get(spec.family, 1.0)
            if factor != 1.0:
                hyper["lr"] = spec.hyperparameters(hyper)["lr"] * factor
            for seed in self.seeds:
                base = RunPlan(
                    model,
                    condition.name,
                    spec,
                    torch.float32,
                    "pure",
                    seed,
                    self.steps,
                    self.batch_size,
                    hyper,
                    frontier=knob,
                    knob_value=value,
                )
                if torch.float32 in self.dtypes:
                    runs.setdefault(base.run_id, base)
                for dtype in low:
                    for mode in self.modes:
                        run = replace(base, dtype=dtype, mode=mode)
                        control = replace(base, control_for=(dtype, mode))
                        runs.setdefault(control.run_id, control)
                        runs.setdefault(run.run_id, run)
        plans = list(runs.values())
        _check_hyperparameters(plans)
        return plans


def _check_hyperparameters(plans: list[RunPlan]) -> None:
    """Build each optimizer once on the MLP, so a bad hyperparameter value stops the suite
    before it starts (the optimizers raise ValueError naming the value)."""
    seen = set()
    for plan in plans:
        key = (plan.optimizer, repr(sorted(plan.hyperparameters.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the runs record their warnings themselves
                plan.spec.build(build_model("mlp", 0), plan.hyperparameters)
        except UsageError:
            raise
        except Exception as err:  # any value the optimizer cannot take is the suite's error
            raise UsageError(
                f"Optimizer {plan.optimizer!r} in suite cannot be built with its "
                f"hyperparameters {plan.hyperparameters} ({type(err).__name__}: {err})."
            ) from None


def _is_int(value: Any) -> bool:
    """An integer, not a bool (TOML's true is no seed or step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _wrap(fn, *args):
    try:
        return fn(*args)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _parse_spec(text: str) -> OptimizerSpec:
    return _wrap(parse_spec, text)


def _strings(table: dict, key: str, where: str, default: list | None = None) -> tuple[str, ...]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise UsageError(f"{where}: {key} must be a non-empty list of strings, got {value!r}.")
    return tuple(value)


def _text(data: dict, key: str, source: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or (key == "name" and not value.strip()):
        raise UsageError(f"Suite {source}: {key} must be a non-empty string, got {value!r}.")
    return value


def _frontier(table: Any, where: str) -> Frontier:
    """A [[frontier]] table, checked: its keys, a known knob, a ladder of valid values
    from mildest to harshest, and an optimizer listed that the knob applies to."""
    if not isinstance(table, dict) or set(table) != FRONTIER_KEYS:
        found = sorted(table) if isinstance(table, dict) else table
        raise UsageError(
            f"{where} must have exactly the keys models, knob, ladder and optimizers "
            f"(found {found})."
        )
    knob_name = table["knob"]
    if not isinstance(knob_name, str) or knob_name not in KNOBS:
        raise UsageError(
            f"{where}: unknown knob {knob_name!r}; expected one of {', '.join(KNOBS)}."
        )
    knob = KNOBS[knob_name]
    ladder = table["ladder"]
    if not isinstance(ladder, list) or not ladder:
        raise UsageError(f"{where}: ladder must be a non-empty list of numbers, got {ladder!r}.")
    for value in ladder:
        try:
            knob.condition(value)  # a positive finite number
        except ValueError as err:
            raise UsageError(f"{where}: {err}") from None
    values = [float(v) for v in ladder]
    if values != knob.mildest_first(values) or len(set(values)) != len(values):
        direction = "decreasing" if knob.harsher == "down" else "increasing"
        raise UsageError(
            f"{where}: the {knob.name} ladder {ladder} must go from the mildest rung to the "
            f"harshest without repeats ({direction} for {knob.name})."
        )
    frontier = Frontier(
        _strings(table, "models", where),
        knob.name,
        tuple(values),
        _strings(table, "optimizers", where),
    )
    if not frontier.applicable():
        raise UsageError(
            f"{where}: knob {knob.name} applies to none of the optimizers listed "
            f"({', '.join(frontier.optimizers)}); it applies to the families "
            f"{', '.join(knob.families)}."
        )
    return frontier


def parse_suite(text: str, source: str) -> Suite:
    """Validate a suite's TOML text; ``source`` names it in error messages.

    Raises:
        UsageError: Invalid TOML, an unknown key or name, or a value of the wrong type.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"Suite {source} is not valid TOML ({err}).") from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UsageError(
            f"Suite {source} has unknown key {unknown[0]!r}; expected keys among "
            f"{', '.join(sorted(TOP_KEYS))}."
        )
    tables = data.get("matrix", [])
    if MATRIX_KEYS & set(data):
        tables = [{k: data[k] for k in MATRIX_KEYS if k in data}, *tables]
    frontier_tables = data.get("frontier", [])
    if not isinstance(tables, list) or not isinstance(frontier_tables, list):
        raise UsageError(f"Suite {source}: matrix and frontier must be arrays of tables.")
    if not tables and not frontier_tables:
        raise UsageError(
            f"Suite {source} lists no runs: give models, scenarios and optimizers, "
            "at the top level or in [[matrix]] tables, or [[frontier]] tables."
        )
    matrices = []
    for i, table in enumerate(tables):
        where = f"Suite {source}, matrix {i + 1}"
        if not isinstance(table, dict) or set(table) != MATRIX_KEYS:
            found = sorted(table) if isinstance(table, dict) else table
            raise UsageError(
                f"{where} must have exactly the keys models, scenarios and optimizers "
                f"(found {found})."
            )
        matrices.append(Matrix(*(_strings(table, k, where) for k in Matrix.__dataclass_fields__)))
    frontiers = tuple(
        _frontier(table, f"Suite {source}, frontier {i + 1}")
        for i, table in enumerate(frontier_tables)
    )
    hyper = data.get("hyperparameters", {})
    if not isinstance(hyper, dict) or not all(isinstance(v, dict) for v in hyper.values()):
        raise UsageError(
            f"Suite {source}: hyperparameters must be tables keyed by optimizer family or "
            'spec, e.g. [hyperparameters."singd:diagonal"].'
        )
    for key, table in hyper.items():
        if ":" in key or key in ("ingd", "ikfac"):
            _parse_spec(key)
        elif key not in ("singd", "kfac", "adamw", "sgd"):
            raise UsageError(
                f"Suite {source}: hyperparameters table {key!r} is neither an optimizer family "
                "(singd, kfac, adamw, sgd) nor a spec string."
            )
        locations = sorted(FILE_LOCATIONS & set(table))
        if locations:
            raise UsageError(
                f"Suite {source}: hyperparameter {locations[0]!r} in table {key!r} names a place "
                "to write, which a suite may not set; stress writes it inside the run "
                "directory (failures/)."
            )
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise UsageError(f"Suite {source}: seeds must be a non-empty list, got {seeds!r}.")
    where = f"Suite {source}"
    suite = Suite(
        name=_text(data, "name", source, Path(source).stem),
        description=_text(data, "description", source, ""),
        source=source,
        text=text,
        matrices=tuple(matrices),
        dtypes=tuple(_wrap(parse_dtype, d) for d in _strings(data, "dtypes", where, ["bfloat16"])),
        modes=_strings(data, "modes", where, ["pure"]),
        seeds=tuple(seeds),
        steps=data.get("steps", 100),
        batch_size=data.get("batch_size", 64),
        every=data.get("every", 10),
        hyperparameters=hyper,
        frontiers=frontiers,
    )
    suite.validate()
    return suite


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (``quick``, ``default``, ``full``) or a user's TOML file.

    Raises:
        UsageError: Neither a built-in name nor a readable file, or an invalid suite.
    """
    if name_or_path in BUILTIN_SUITES:
        text = resources.files("precision_lab").joinpath(f"suites/{name_or_path}.toml").read_text()
        return parse_suite(text, name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise UsageError(
            f"Suite {name_or_path!r} is neither a built-in suite "
            f"({', '.join(BUILTIN_SUITES)}) nor an existing TOML file."
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UsageError(f"Suite {path} cannot be read ({err.strerror or err}).") from None
    except UnicodeDecodeError as err:
        raise UsageError(
            f"Suite {path} is not UTF-8 text, as TOML requires (byte {err.start}: "
            f"{err.reason}); save it as UTF-8."
        ) from None
    return parse_suite(text, str(path))
