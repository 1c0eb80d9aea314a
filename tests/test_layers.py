"""The house rules: imports point down the layers, and no module imports itself in a circle.

Layers, bottom to top: core → models → optimizations → bench's shared nouns (configuration,
designs, store) → bench.measure | bench.judge (siblings that never import each other) →
bench.report → bench.suite, bench.calibration and bench.sweep → the CLI. Every import
counts, including those inside functions and under TYPE_CHECKING: a cycle hidden there is
still a cycle for a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "models", "optimizations", "bench")

# (group, rank, modules): a module belongs to the group naming it or a package above it. It may
# import its own group or a lower rank. "bench" alone is the (empty) package itself.
LAYERS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("core", 0, ("core",)),
    ("models", 1, ("models",)),
    ("optimizations", 2, ("optimizations",)),
    ("bench nouns", 3, ("bench", "bench.configuration", "bench.designs", "bench.store")),
    ("measure", 4, ("bench.measure",)),
    ("judge", 4, ("bench.judge",)),
    ("report", 5, ("bench.report",)),
    ("orchestration", 6, ("bench.suite", "bench.calibration", "bench.sweep")),
    ("cli", 7, ("bench.cli", "bench.commands")),
)


def product_modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the product packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that the file imports anywhere in its body (resolving `from pkg import mod`)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            # `import a.b.c` also imports a and a.b; keep the longest name that is ours.
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def rank(module: str) -> tuple[str, int]:
    """The layer group a module belongs to (by its longest matching name) and its rank."""
    matches = [
        (len(name), group, value)
        for group, value, names in LAYERS
        for name in names
        if module == name or (name != "bench" and module.startswith(name + "."))
    ]
    if not matches:
        raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS")
    _, group, value = max(matches)
    return group, value


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import that does not point down or stay inside its group."""
    wrong = []
    for module, imports in sorted(graph.items()):
        group, level = rank(module)
        for target in sorted(imports):
            target_group, target_level = rank(target)
            if target_group != group and target_level >= level:
                wrong.append(f"{module} imports {target}")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        return list(error.args[1])
    return None


def test_the_checks_catch_what_they_are_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"models.x": {"bench.store"}, "bench.store": set()}) == [
        "models.x imports bench.store"
    ]
    assert upward_imports({"bench.judge.a": {"bench.measure.b"}, "bench.measure.b": set()}) == [
        "bench.judge.a imports bench.measure.b"
    ]


def test_every_module_is_in_a_layer_and_imports_point_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle_anywhere():
    assert find_cycle(import_graph()) is None


def test_the_lower_layers_import_without_bench():
    """Each module of core, models and optimizations imports in a fresh interpreter where
    `bench` cannot be imported at all (this also catches importlib-based imports)."""
    lower = [name for name in product_modules() if not name.startswith("bench")]
    script = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'bench' or name.startswith('bench.'):\n"
        "            raise ImportError(f'{name} is above this layer')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {lower!r}:\n"
        "    importlib.import_module(name)\n"
        "from optimizations.registry import transform_classes\n"
        "assert transform_classes()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("package", ["models", "optimizations", "core"])
def test_no_module_below_bench_names_it(package):
    graph = import_graph()
    assert not [
        f"{module} imports {target}"
        for module, imports in graph.items()
        if module.startswith(package)
        for target in imports
        if target.startswith("bench")
    ]
