"""The passes package: imports point one way (no cycle, no import hidden in a function to dodge one),
and every module says what it matches and emits."""

from __future__ import annotations

import ast
import pathlib

import wisparse_compile.passes as passes

ROOT = pathlib.Path(passes.__file__).parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")


def _sibling_imports(module: str) -> tuple[set[str], list[str]]:
    """(passes modules ``module`` imports, those imported inside a function)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found: set[str] = set()
    nested: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                found.add(name)
                if id(node) in inside:
                    nested.append(name)
    return found, nested


def test_pass_modules_import_one_way():
    graph = {m: _sibling_imports(m)[0] for m in MODULES}
    assert all(dep in MODULES for deps in graph.values() for dep in deps), graph
    nested = {m: _sibling_imports(m)[1] for m in MODULES if _sibling_imports(m)[1]}
    assert not nested, f"imports hidden inside functions: {nested}"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for dep in graph[module]:
            visit(dep, path + (module,))
        done.add(module)

    for module in MODULES:
        visit(module, ())
    assert {"graph_utils", "eligibility", "rewrite_linears", "rewrite_experts", "fuse_siblings"} <= set(MODULES)


def test_every_pass_module_says_what_it_matches_and_emits():
    for module in MODULES:
        doc = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text())) or ""
        assert "match" in doc.lower() and "emit" in doc.lower(), module
