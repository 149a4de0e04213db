"""The web app's modules import each other without cycles, counting imports inside functions too
(a function-level import hides a cycle from the interpreter, not from the reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WEBAPP = Path(__file__).resolve().parent.parent / "webapp"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module in ``package`` (migrations left out: Django imports those)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the file may load."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. A module's own parent packages are left out: they
    are always loaded before it, so an edge to one is no cycle."""
    modules = module_files(package)
    graph = {}
    for module, path in modules.items():
        ancestors = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)}
        graph[module] = {name for name in imported_names(module, path)
                         if name in modules and name != module and name not in ancestors}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path that ends where it starts, or [] when there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for imported in sorted(graph[module]):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


def test_webapp_modules_import_each_other_without_cycles():
    cycle = find_cycle(import_graph(WEBAPP))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    package = tmp_path / "app"
    (package / "jobs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs" / "__init__.py").write_text("")
    (package / "jobs" / "services.py").write_text("def enqueue():\n    from .tasks import run\n")
    (package / "jobs" / "tasks.py").write_text("from . import recovery\n")
    (package / "jobs" / "recovery.py").write_text("from app.jobs.services import enqueue\n")
    assert find_cycle(import_graph(package)) == [
        "app.jobs.recovery", "app.jobs.services", "app.jobs.tasks", "app.jobs.recovery"]


@pytest.mark.parametrize("source", ["from .. import models\n", "from ..models import Thing\n"])
def test_relative_imports_resolve_to_the_right_module(tmp_path, source):
    package = tmp_path / "app"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "views.py").write_text(source)
    assert import_graph(package)["app.sub.views"] == {"app.models"}
