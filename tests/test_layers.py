"""The package's layers import one way, down, and no module imports itself round a cycle.

Every ``import`` in every module counts, at the top or inside a function, so a cycle cannot hide
behind a local import. The layers, top to bottom (docs/architecture.md):

    cli, api       the command line; the Python API
    commands       one module per command; the shared wiring
    train, demo    the loop and what it needs; the demo's corpus, judge and report
    objectives     batch -> (loss, metrics)
    losses, models pure loss functions; loading, log-probs, references
    data           rows -> records -> tokenized examples -> batches
    base           config loading, fields, errors, files
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "preftune"
# Top to bottom; a module may import from its own layer and every layer below it.
LAYERS: list[tuple[str, ...]] = [
    ("preftune.cli", "preftune.__main__", "preftune.api"),
    ("preftune.commands",),
    ("preftune.train", "preftune.demo"),
    ("preftune.objectives",),
    ("preftune.losses", "preftune.models"),
    ("preftune.data",),
    (
        "preftune.config",
        "preftune.fields",
        "preftune.errors",
        "preftune.files",
        "preftune.shares",
        "preftune",
    ),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from package import module`` names a module; ``from module import name`` not.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def layer(name: str) -> int:
    """The index of the layer ``name`` belongs to: its longest matching prefix."""
    best, rank = -1, len(LAYERS)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def test_every_module_belongs_to_a_layer() -> None:
    assert [name for name in modules() if layer(name) == len(LAYERS)] == []


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer(target) < layer(name)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    edges = graph()
    # A package's __init__ importing its own submodules (a registry) is not a cycle through
    # them unless a submodule imports the package back; both directions are kept.
    cycles = [component for component in strongly_connected(edges) if len(component) > 1]
    assert cycles == []


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph ``edges``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_checker_finds_a_cycle_and_an_upward_import() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert [sorted(c) for c in strongly_connected(edges) if len(c) > 1] == [["a", "b", "c"]]
    assert layer("preftune.data.encode") > layer("preftune.models.load") > layer("preftune.cli")


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_dependency_order() -> None:
    """A fresh interpreter imports each module bottom layer first; each import must work with
    only the layers below it loaded."""
    # ``preftune.__main__`` runs the command line when imported: it is not a library module.
    order = sorted((m for m in modules() if m != "preftune.__main__"), key=lambda m: (-layer(m), m))
    script = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
