"""Imports point one way: every module imports, and the package's import graph has no cycle.

The graph is read from the source (``from .x import``, ``from ..x import``, ``import
wisparse_compile.x``), module-level and function-level alike: a lazy import inside a function still
ties two modules together.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import wisparse_compile

PACKAGE = "wisparse_compile"
ROOT = Path(wisparse_compile.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name a relative ``from`` import in ``module`` refers to."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (a name imported from a package counts as that
    submodule when one exists, else as the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    source = _resolve(name, path.name == "__init__.py", node.level, node.module)
                elif node.module and node.module.split(".")[0] == PACKAGE:
                    source = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edges.add(sub if sub in modules else source)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE and a.name in modules)
        # a package's own submodules are part of it, not a dependency of it
        graph[name] = {e for e in edges if e != name and not (path.name == "__init__.py" and e.startswith(name + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("module", sorted(
    m.name for m in pkgutil.walk_packages(wisparse_compile.__path__, PACKAGE + ".") if not m.name.endswith(".__main__")
))
def test_every_module_imports(module):  # (``__main__`` modules run the CLI on import)
    importlib.import_module(module)


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "wisparse_compile.observer" in graph["wisparse_compile.calibrate"]  # the graph is read at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_point_one_way():
    """The shared leaves import nothing from the package; the eager reference does not import calibration."""
    graph = import_graph()
    for leaf in ("wisparse_compile.mask", "wisparse_compile.linear_forms", "wisparse_compile.model_io"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert "wisparse_compile.calibrate" not in graph["wisparse_compile.reference"]
    assert not any(e.startswith("wisparse_compile.kernels") for e in graph["wisparse_compile.observer"])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def readme_module_map() -> list[list[str]]:
    """The README's module map: one entry per line, each a list of paths (``plan.py, files.py``)."""
    readme = (ROOT.parent / "README.md").read_text()
    block = readme.split("## How the code is laid out", 1)[1].split("```", 2)[1]
    return [[name.strip() for name in line[:21].split(",")] for line in block.strip().splitlines()]


def _entry_of(module: str, entries: list[list[str]]) -> int | None:
    """The map entry holding ``module``: a file's own entry wins over its folder's."""
    path = module.removeprefix(PACKAGE).lstrip(".").replace(".", "/")
    if not path:
        return None  # the package's __init__ re-exports everything
    folder = None
    for i, names in enumerate(entries):
        for name in names:
            if name == f"{path}.py":
                return i
            if name.endswith("/") and f"{path}/".startswith(name) and folder is None:
                folder = i
    return folder


def test_readme_module_map_lists_the_layers_leaves_first():
    """README: 'each entry imports only entries above it' holds, and every module has an entry."""
    entries = readme_module_map()
    assert len(entries) > 20 and ["config.py"] in entries
    upward = []
    for module, imports in import_graph().items():
        here = _entry_of(module, entries)
        if module != PACKAGE:
            assert here is not None, f"{module} has no entry in the README's module map"
        for imported in imports:
            there = _entry_of(imported, entries)
            if here is not None and there is not None and there > here:
                upward.append(f"{entries[here]} imports {entries[there]} ({module} -> {imported})")
    assert not upward, "the README's module map lists these imports upward:\n" + "\n".join(upward)
