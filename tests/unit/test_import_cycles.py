"""lab/ has no import cycles: computed statically (ast over lab/**/*.py), so
a cycle fails here, with its path and the lines that make it, before it
becomes an ImportError that depends on which module happens to be imported
first.

Two graphs. The import-time one (imports at module level, the ones that run
when a module is imported) must have no cycle at all. The full one adds the
imports deferred into functions: a cycle there is two layers that each need
the other, even if the deferral keeps it from failing at import time; only
the ones in ``DEFERRED_CYCLES`` are tolerated, each with the reason, and an
entry that no longer is a cycle must go.

Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "lab"

#: cycles through deferred imports that are known, as sets of modules
# none: every cycle, deferred or not, is a failure
DEFERRED_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, deferred: bool):
    """(import node, whether it is deferred into a function) of *tree*,
    without those under ``if TYPE_CHECKING:``."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if inner and not deferred:
                continue
            yield from walk(child, inner)
    yield from walk(tree, False)


def import_graph(root: Path = LAB, *, deferred: bool) -> dict[str, dict[str, str]]:
    """``{module: {imported lab module: "file:line"}}`` over the package at
    *root*; with *deferred*, imports inside functions count too."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, str] = {}
        for node, _ in _imports(ast.parse(path.read_text(), str(path)), deferred):
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                name = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in files]
                targets = subs + ([name] if len(subs) < len(node.names) else [])
            for t in targets:
                if t in files and t != mod:
                    edges.setdefault(t, where)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan),
    each as one cycle through it: ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path_through(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _path_through(graph: dict[str, dict[str, str]], comp: set[str]) -> list[str]:
    """A cycle inside the component *comp*, from its first module back to it."""
    start = min(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in comp and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {comp}")


def describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} imports {b} at {graph[a][b]}" for a, b in itertools.pairwise(cycle))


def test_no_import_time_cycle():
    graph = import_graph(deferred=False)
    assert len(graph) > 20 and "lab.kernels.lookup" in graph
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_no_cycle_through_deferred_imports_but_the_known_ones():
    graph = import_graph(deferred=True)
    found = cycles(graph)
    unknown = [c for c in found if frozenset(c) not in DEFERRED_CYCLES]
    assert not unknown, "import cycles (counting imports inside functions):\n" + "\n".join(
        describe(graph, c) for c in unknown)
    gone = DEFERRED_CYCLES - {frozenset(c) for c in found}
    assert not gone, f"no longer cycles, remove them from DEFERRED_CYCLES: {gone}"


def test_the_checker_finds_a_cycle_and_ignores_type_checking(tmp_path):
    """The graph and the cycle search on a made-up package: a deferred cycle
    is seen only with deferred imports, a TYPE_CHECKING import never."""
    pkg = tmp_path / "lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("from lab import top\nX = 1\n")
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lab.sub import leaf\n"
        "def f():\n    from .sub import X\n")
    eager = import_graph(pkg, deferred=False)
    assert eager["lab.sub"] == {"lab.sub.leaf": "lab/sub/__init__.py:1"}
    assert eager["lab.top"] == {}  # TYPE_CHECKING only, and a deferred import
    assert cycles(eager) == []
    full = import_graph(pkg, deferred=True)
    assert full["lab.top"] == {"lab.sub": "lab/top.py:5"}
    [cycle] = cycles(full)
    assert cycle == ["lab.sub", "lab.sub.leaf", "lab.top", "lab.sub"]
    assert "lab.top imports lab.sub at lab/top.py:5" in describe(full, cycle)


@pytest.mark.parametrize("module", ["lab.kernels", "lab.build", "lab.cache", "lab.errors"])
def test_layer_below_imports_nothing_above(module):
    """The kernels package, the lock and the errors sit low: none of them
    reaches the modules that start processes or draw (a fresh interpreter
    is not needed: the static graph says what they import)."""
    graph = import_graph(deferred=True)
    reach, todo = set(), [m for m in graph if m == module or m.startswith(module + ".")]
    while todo:
        m = todo.pop()
        for n in graph[m]:
            if n not in reach:
                reach.add(n)
                todo.append(n)
    above = {"lab.vm", "lab.session", "lab.runner", "lab.api", "lab.widgets", "lab.cli", "lab.image"}
    assert not reach & above, sorted(reach & above)
