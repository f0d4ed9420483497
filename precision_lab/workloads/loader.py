"""Workloads by name: a built-in (``mlp``, ``lm``, ...) or an import path.

An import path is ``package.module:NAME`` (an importable module) or
``path/to/file.py:NAME`` (a Python file, relative to the working directory), where
``NAME`` is a `Workload` or a callable taking no argument that returns one. Every way
this can go wrong (no such file, module or attribute, an import or a call that raises,
something that is not a workload) raises `WorkloadError` with one sentence.

A file or module is imported once per process, and a callable called once per batch size
asked for: every run of a suite trains the same workload object.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from precision_lab.errors import UsageError
from precision_lab.workloads.builtin import BUILTINS, build_builtin
from precision_lab.workloads.workload import Workload, first_line

_LOADED: dict[tuple[str, int], Workload] = {}
_FILES: dict[Path, Any] = {}


class WorkloadError(UsageError):
    """A workload name that does not lead to a `Workload` (one sentence, exit 2)."""


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``module:NAME`` or ``file.py:NAME``."""
    return ":" in name


def load_workload(name: str, batch_size: int) -> Workload:
    """The workload ``name`` names, named for summaries (its own ``name``, else ``name``
    itself for a built-in, ``stem:NAME`` for a file, ``module:NAME`` for a module).

    Args:
        name: A built-in's name or an import path (module docstring).
        batch_size: Examples per batch of a built-in (a user's workload makes its own).

    Raises:
        WorkloadError: The name leads to no workload, in one sentence.
    """
    key = (name, batch_size)
    if key not in _LOADED:
        _LOADED[key] = _load(name, batch_size)
    return _LOADED[key]


def _load(name: str, batch_size: int) -> Workload:
    if not is_import_path(name):
        try:
            return build_builtin(name, batch_size)
        except ValueError:
            raise WorkloadError(
                f"Unknown model {name!r}; expected a built-in ({', '.join(BUILTINS)}), "
                "package.module:NAME or path/to/file.py:NAME."
            ) from None
    where, _, attribute = name.rpartition(":")
    if not where or not attribute.isidentifier():
        raise WorkloadError(
            f"Model {name!r} is no import path: write package.module:NAME or "
            "path/to/file.py:NAME, NAME a Workload or a function returning one."
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        module, label = _import_file(Path(where), name), f"{Path(where).stem}:{attribute}"
    else:
        module, label = _import_module(where, name), f"{where}:{attribute}"
    if not hasattr(module, attribute):
        raise WorkloadError(f"Model {name!r}: {where} has no attribute {attribute!r}.")
    found = getattr(module, attribute)
    if not isinstance(found, Workload):
        found = _call(found, name)
    workload = found.named(label)
    if not workload.name or "/" in workload.name:
        raise WorkloadError(
            f"Model {name!r} is named {workload.name!r}; a workload's name must be non-empty "
            "and without '/' (run ids use '/' between their parts)."
        )
    return workload


def _call(found: Any, name: str) -> Workload:
    """``found()`` when it is callable and returns a `Workload`."""
    if not callable(found):
        raise WorkloadError(
            f"Model {name!r} is a {type(found).__name__}, not a precision_lab.Workload or a "
            "function returning one."
        )
    try:
        result = found()
    except Exception as err:
        raise WorkloadError(
            f"Model {name!r}: calling it raised {type(err).__name__}: {first_line(err)}."
        ) from None
    if not isinstance(result, Workload):
        raise WorkloadError(
            f"Model {name!r} returned a {type(result).__name__}, not a precision_lab.Workload."
        )
    return result


def _import_file(path: Path, name: str) -> Any:
    """The module of a Python file, imported once (under a name no other module has)."""
    if not path.is_file():
        raise WorkloadError(f"Model {name!r}: the file {path} does not exist.")
    resolved = path.resolve()
    if resolved not in _FILES:
        module_name = f"precision_lab_workload_{len(_FILES)}_{resolved.stem}"
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        if spec is None or spec.loader is None:
            raise WorkloadError(f"Model {name!r}: {path} cannot be imported as Python.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise WorkloadError(
                f"Model {name!r}: importing {path} raised {type(err).__name__}: {first_line(err)}."
            ) from None
        _FILES[resolved] = module
    return _FILES[resolved]


def _import_module(where: str, name: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name is not None and (where + ".").startswith(err.name + "."):
            raise WorkloadError(
                f"Model {name!r}: no module named {err.name!r} (is it installed, or on "
                "PYTHONPATH?)."
            ) from None
        raise WorkloadError(
            f"Model {name!r}: importing {where} raised ModuleNotFoundError: {first_line(err)}."
        ) from None
    except Exception as err:
        raise WorkloadError(
            f"Model {name!r}: importing {where} raised {type(err).__name__}: {first_line(err)}."
        ) from None
