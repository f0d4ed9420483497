"""The layout keeps its promises (docs/ARCHITECTURE.md): data flows one way through the
subpackages, no module imports itself back, and ``import precision_lab`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "precision_lab"

MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "dtypes": set(),
    "specs": {"errors", "dtypes"},
    "workloads": {"errors"},
    "memory": {"errors", "dtypes", "specs", "workloads"},
    "run": {"errors", "dtypes", "specs", "workloads"},
    "report": {"errors", "dtypes", "specs", "workloads", "memory", "run"},
    "gate": {"precision_lab", "errors", "run"},
    "cli": {"precision_lab", "errors", "dtypes", "specs", "workloads", "memory", "run", "report"}
    | {"gate"},
    "precision_lab": {"run", "workloads"},
    "__main__": {"cli"},
}
"""Which parts of precision_lab each part (a top-level module or a subpackage) may import,
besides itself; ``precision_lab`` is the package's ``__init__`` (``__version__``,
``load_run``, ``Workload``)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str) -> set[str]:
    """The precision_lab modules ``name`` imports anywhere (in functions too), except
    under ``if TYPE_CHECKING:``; ``from a import b`` counts ``a.b`` where that is a module."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking(node)
        for child in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            }
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_import_graph_is_found():
    assert "precision_lab.run.directory" in GRAPH["precision_lab.cli.stress"]
    assert "precision_lab.run.summary" in GRAPH["precision_lab.report.tables"]
    # TYPE_CHECKING imports are not dependencies.
    assert "precision_lab.report.data" not in GRAPH["precision_lab.report.figures"]


def test_no_module_imports_itself_back():
    try:
        TopologicalSorter(GRAPH).prepare()
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_part_imports_only_what_it_may(module):
    part = _part(module)
    assert part in MAY_IMPORT, f"{module} belongs to no part of docs/ARCHITECTURE.md"
    forbidden = {m for m in GRAPH[module] if _part(m) not in MAY_IMPORT[part] | {part}}
    assert not forbidden, f"{module} may not import {sorted(forbidden)}"


def test_importing_the_package_leaves_plotly_and_the_report_unloaded():
    code = (
        "import sys, precision_lab; precision_lab.load_run; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'plotly' "
        "or m.startswith(('precision_lab.report', 'precision_lab.gate', 'precision_lab.cli'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
