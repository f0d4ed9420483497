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
from precision_lab.run.resolve import resolve_workload
from precision_lab.specs import OptimizerSpec, parse_spec
from precision_lab.workloads.loader import is_import_path
from precision_lab.workloads.models import build_model
from precision_lab.workloads.scenarios import get_scenario

BUILTIN_SUITES = ("quick", "default", "full")
KRONECKER_FAMILIES = ("singd", "kfac")
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
}
MATRIX_KEYS = {"models", "scenarios", "optimizers"}
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
        source: The import path the suite named the workload by (``file.py:NAME``,
            ``module:NAME``), whose ``name`` is ``model``; None for a built-in.
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
    source: str | None = None

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
        """This suite with the command line's choices replacing the suite's own lists."""
        matrices = tuple(
            Matrix(
                tuple(models) if models else m.models,
                tuple(scenarios) if scenarios else m.scenarios,
                tuple(optimizers) if optimizers else m.optimizers,
            )
            for m in self.matrices
        )
        chosen = replace(
            self,
            matrices=matrices,
            dtypes=tuple(dtypes) if dtypes else self.dtypes,
            modes=tuple(modes) if modes else self.modes,
            seeds=tuple(seeds) if seeds else self.seeds,
            steps=self.steps if steps is None else steps,
            every=self.every if every is None else every,
        )
        chosen.validate()
        return chosen

    def validate(self) -> None:
        """Check every name and number; `UsageError` (one sentence) on the first bad one."""
        for matrix in self.matrices:
            self._check_models(matrix.models, matrix.optimizers)
            for scenario in matrix.scenarios:
                _wrap(get_scenario, scenario)
            for spec in matrix.optimizers:
                _parse_spec(spec)
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

    def _check_models(self, models: tuple[str, ...], optimizers: tuple[str, ...]) -> None:
        """Each model names a usable workload (`precision_lab.run.resolve`), one that SINGD
        and KFAC can precondition where they train it; no two models share a name."""
        kronecker = any(_parse_spec(s).family in KRONECKER_FAMILIES for s in optimizers)
        names: dict[str, str] = {}
        for model in models:
            if not _is_int(self.batch_size) or self.batch_size < 1:
                return  # reported with the numbers
            name = resolve_workload(model, self.batch_size, kronecker=kronecker).name
            if names.setdefault(name, model) != model:
                raise UsageError(
                    f"Suite {self.name!r}: models {names[name]!r} and {model!r} are both named "
                    f"{name!r}; give one of them another name (Workload's name=)."
                )

    def plan(self) -> list[RunPlan]:
        """The runs in order: for each configuration, a float32 control before each run.

        Scenarios that do not apply to an optimizer family (``Scenario.overrides`` returns
        None) are skipped; a run listed by two matrices runs once.
        """
        low = [d for d in self.dtypes if d != torch.float32]
        runs: dict[str, RunPlan] = {}
        for matrix in self.matrices:
            for model in matrix.models:
                workload = resolve_workload(model, self.batch_size, kronecker=False)
                source = model if is_import_path(model) else None
                for scenario_name in matrix.scenarios:
                    scenario = get_scenario(scenario_name)
                    for spec_text in matrix.optimizers:
                        spec = _parse_spec(spec_text)
                        extra = scenario.overrides(spec.family)
                        if extra is None:
                            continue
                        hyper = {
                            **self.hyperparameters.get(spec.family, {}),
                            **self.hyperparameters.get(spec_text, {}),
                            **extra,
                        }
                        for seed in self.seeds:
                            base = RunPlan(
                                workload.name,
                                scenario_name,
                                spec,
                                torch.float32,
                                "pure",
                                seed,
                                self.steps,
                                self.batch_size,
                                hyper,
                                source=source,
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
    if not isinstance(tables, list) or not tables:
        raise UsageError(
            f"Suite {source} lists no runs: give models, scenarios and optimizers, "
            "at the top level or in [[matrix]] tables."
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
