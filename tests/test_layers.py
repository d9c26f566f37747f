"""The package's layers: no import cycle anywhere, imports point to the same or an earlier layer of
docs/ARCHITECTURE.md, and ``config/`` imports only ``config/`` (module- and function-level imports alike)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "lifealign").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file, ``TYPE_CHECKING`` blocks included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lifealign"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(_resolve(full if full in mods else node.module, mods) or "")
            elif isinstance(node, ast.Import):
                deps.update(_resolve(a.name, mods) or "" for a in node.names if a.name.startswith("lifealign"))
        graph[module] = deps - {"", module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def documented_layers() -> dict[str, int]:
    """``{subpackage: layer number}`` from the numbered list between the layer markers of docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    layers = {}
    for line in block.strip().splitlines():
        number, names = line.split(".", 1)
        for name in re.findall(r"`([a-z_]+)`", names):
            layers[name] = int(number)
    return layers


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else "cli"  # the root and __main__ are the CLI's


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_imports_only_config():
    outside = {m: sorted(d for d in deps if not d.startswith("lifealign.config")) for m, deps in import_graph().items()}
    assert {m: d for m, d in outside.items() if m.startswith("lifealign.config") and d} == {}


def test_every_import_points_to_the_same_or_an_earlier_documented_layer():
    layers = documented_layers()
    graph = import_graph()
    undocumented = sorted({_subpackage(m) for m in graph} - set(layers))
    assert undocumented == [], f"subpackages missing from docs/ARCHITECTURE.md's layer list: {undocumented}"
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if layers[_subpackage(dep)] > layers[_subpackage(module)]
    )
    assert upward == []


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its signature to its end, without its docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        docstring = body[0].end_lineno - body[0].lineno + 1
    else:
        docstring = 0
    return node.end_lineno - node.lineno + 1 - docstring


def test_functions_stay_small():
    """The one loop (``train_task``) may take 120 lines; every other function 60, docstrings not counted."""
    too_long = []
    for path in sorted((SRC / "lifealign").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = 120 if node.name == "train_task" else 60
                if _body_lines(node) > limit:
                    too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert too_long == []
