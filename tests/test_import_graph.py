"""The package's import graph, read from the source: no cycles, and every import of the package's own
modules inside a function says why it is there."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harmonic"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of the package's own modules.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``;
    relative imports are resolved against ``name``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "harmonic":
                        found.append((alias.name, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "harmonic":
                    continue
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.append((target if target in known else base, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {t for t, _, _ in _imports(path, name, known) if t in known and t != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "harmonic.losses.harmonic" in graph and "harmonic.engine.training" in graph
    assert "harmonic.models.head_loss" in graph["harmonic.models.retinanet"]
    assert "harmonic.ops.native" in graph["harmonic.ops.focal"]  # `from harmonic.ops import native`


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    # module-level and function-level imports alike; a package's __init__ importing its own submodules is
    # an edge like any other, while a submodule importing a sibling does not import the package itself.
    assert _cycles(_graph()) == []


def test_imports_inside_functions_say_why():
    modules = _modules()
    known = set(modules)
    silent = []
    for name, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, inside in _imports(path, name, known):
            if inside and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert silent == [], "an import inside a function needs a comment saying why:\n" + "\n".join(silent)


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [name for name in _modules() if name.rpartition(".")[2] in sys.stdlib_module_names
                 and name.count(".") == 1]
    assert shadowing == []
