"""Facts about the code's structure that a reviewer would otherwise check by hand."""

import ast
import re
from pathlib import Path

import ktm
from ktm.model import KTokenMerging

SRC = Path(ktm.__file__).parent
ROOT = SRC.parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """ktm module -> the ktm modules it imports (at any depth of the file, lazy imports
    included). Imports of the package itself (``from . import __version__``) are left
    out: ``ktm/__init__.py`` only re-exports."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                for alias in node.names:  # "from . import objectives" imports a module
                    if f"{target}.{alias.name}" in modules:
                        deps.add(f"{target}.{alias.name}")
                if target in modules:
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = {d for d in deps if d not in ("ktm", name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"ktm.model", "ktm.objectives"} <= graph["ktm.trainer"] and "ktm.bench.modes" in graph["ktm.bench"]
    assert find_cycle(graph) is None


def test_no_module_outside_model_py_touches_the_models_privates():
    names = {n for n in vars(KTokenMerging) if n.startswith("_") and not n.startswith("__")}
    names |= {"_decoder", "_lm_head", "_static"}  # set in __init__
    pattern = re.compile(r"\.(" + "|".join(sorted(names)) + r")\b")
    files = [p for p in SRC.rglob("*.py") if p.name != "model.py"] + list((ROOT / "benchmarks").rglob("*.py"))
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_functions_are_short_or_say_why():
    """No function in src/ktm is longer than 60 lines unless its docstring says why ("long because")."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and "long because" not in (ast.get_docstring(node) or "").lower():
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
