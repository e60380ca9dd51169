"""Facts about the code's structure that a reviewer would otherwise check by hand.

Each rule is a small function over source text or an import graph, so that a test can plant a
violation and see the rule catch it (``test_each_rule_catches_a_planted_violation``).
"""

import ast
from pathlib import Path

import ktm

SRC = Path(ktm.__file__).parent
ROOT = SRC.parents[1]

#: the layers, top to bottom: a module imports only from its own group or from lower layers
#: (cli -> experiments -> train / serve -> tasks / model -> config, typecheck, arguments, checkpoint, loading,
#: hub, card)
LAYERS = {
    "ktm.cli": 5,
    "ktm.experiments": 4,
    "ktm.train": 3, "ktm.serve": 3,
    "ktm.tasks": 2, "ktm.model": 2,
    "ktm.config": 1, "ktm.typecheck": 1, "ktm.arguments": 1, "ktm.checkpoint": 1, "ktm.loading": 1, "ktm.hub": 1,
    "ktm.card": 1,
}
#: caps in lines; a longer one says why in its docstring ("long because ...")
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 400, 300, 60
ESCAPE = "long because"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(name: str, source: str, modules, is_package: bool = False) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports (lazy imports included).
    Imports of the package itself (``from .. import __version__``) are left out:
    ``ktm/__init__.py`` only re-exports."""
    package = name if is_package else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            submodules = {f"{target}.{a.name}" for a in node.names} & set(modules)
            deps |= submodules  # "from . import objectives" imports a module, not its package
            if target in modules and len(submodules) < len(node.names):
                deps.add(target)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in modules}
    return {d for d in deps if d not in ("ktm", name)}


def import_graph() -> dict[str, set[str]]:
    """ktm module -> the ktm modules it imports."""
    modules = package_modules()
    return {name: imports_of(name, path.read_text(), modules, path.name == "__init__.py")
            for name, path in modules.items()}


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


def layer_of(module: str) -> tuple[str, int]:
    """The module's group (``ktm.train``, ``ktm.config``, ...) and its layer."""
    group = ".".join(module.split(".")[:2])
    if group not in LAYERS:
        raise KeyError(f"{module} is in no layer: add its group to LAYERS")
    return group, LAYERS[group]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up, or sideways into another group of the same layer (the bottom
    layer's three modules may use each other)."""
    bad = []
    for module, deps in sorted(graph.items()):
        if module == "ktm":  # the package only re-exports the public names
            continue
        group, layer = layer_of(module)
        for dep in sorted(deps):
            dep_group, dep_layer = layer_of(dep)
            if dep_group != group and dep_layer >= layer and not dep_layer == layer == 1:
                bad.append(f"{module} -> {dep}")
    return bad


def oversized(source: str, where: str = "") -> list[str]:
    """Modules over MAX_MODULE lines, classes over MAX_CLASS, functions over MAX_FUNCTION,
    unless their docstring says why ("long because")."""
    tree = ast.parse(source)
    found = []

    def check(node, kind, limit, lines):
        if lines > limit and ESCAPE not in (ast.get_docstring(node) or "").lower():
            found.append(f"{where}:{getattr(node, 'lineno', 1)} {kind} {getattr(node, 'name', '')} "
                         f"({lines} lines > {limit})")

    check(tree, "module", MAX_MODULE, len(source.splitlines()))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            check(node, "class", MAX_CLASS, node.end_lineno - node.lineno + 1)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            check(node, "function", MAX_FUNCTION, node.end_lineno - node.lineno + 1)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_privates(source: str) -> set[str]:
    """The private names a module defines: functions, classes, module variables and
    attributes it assigns (``self._x = ...``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def private_reaches(source: str, ktm_privates: set[str], where: str = "") -> list[str]:
    """Uses of a ktm private name (one some ktm module defines) that this module does not
    define itself: ``from ktm.x import _name``, ``obj._name``."""
    home = defined_privates(source)
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        found += [f"{where}:{node.lineno} {n}" for n in names
                  if _private(n) and n in ktm_privates and n not in home]
    return found


def _sources(*folders) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for folder in folders for p in sorted(folder.rglob("*.py"))}


# ---------------------------------------------------------------- the rules, on the code
def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"ktm.model", "ktm.train.objectives"} <= graph["ktm.train.trainer"]
    assert "ktm.experiments.bench.modes" in graph["ktm.experiments.bench"]
    assert find_cycle(graph) is None


def test_imports_follow_the_layer_map():
    assert layer_violations(import_graph()) == []


def test_the_library_never_imports_benchmarks_or_tests():
    offenders = [f"{name}: {node.module}" for name, path in package_modules().items()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                 and node.module.split(".")[0] in ("benchmarks", "tests")]
    assert offenders == []


def test_modules_classes_and_functions_are_short_or_say_why():
    found = [o for where, text in _sources(SRC).items() for o in oversized(text, where)]
    assert found == []


def test_privates_stay_home_in_the_package_tests_and_benchmarks():
    package = _sources(SRC)
    ktm_privates = set().union(*(defined_privates(t) for t in package.values()))
    everything = {**package, **_sources(ROOT / "tests", ROOT / "benchmarks")}
    found = [o for where, text in everything.items() for o in private_reaches(text, ktm_privates, where)]
    assert found == []


# ---------------------------------------------------------------- the rules catch what they should
def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_rule_catches_a_planted_violation():
    # layers: the model reaching up into training, and sideways from serving into training
    graph = {"ktm.model.core": {"ktm.train.trainer", "ktm.config"}, "ktm.serve.export": {"ktm.train.zoo"},
             "ktm.train.trainer": {"ktm.model.core"}, "ktm.config": {"ktm.loading"}}
    assert layer_violations(graph) == ["ktm.model.core -> ktm.train.trainer", "ktm.serve.export -> ktm.train.zoo"]
    # sizes: one over-long function, class and module each, and the same with a reason
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION))
    assert len(oversized(f"def f():\n{body}", "m.py")) == 1
    assert oversized(f'def f():\n    """Long because it must be."""\n{body}') == []
    methods = "".join(f"    def m{i}(self):\n        return {i}\n" for i in range(MAX_CLASS // 2))
    assert [o.split()[1] for o in oversized(f"class C:\n{methods}")] == ["class"]
    assert [o.split()[1] for o in oversized("x = 1\n" * (MAX_MODULE + 1))] == ["module"]
    assert oversized(f'"""Long because: a table."""\n' + "x = 1\n" * MAX_MODULE) == []
    # privates: importing or reaching into another module's private, but not one's own
    privates = defined_privates("class A:\n    def __init__(self):\n        self._state = 1\n\ndef _helper(): pass\n")
    assert privates == {"_state", "_helper"}
    assert private_reaches("from ktm.model.core import _helper\n", privates, "t.py") == ["t.py:1 _helper"]
    assert private_reaches("def f(m):\n    return m._state\n", privates, "t.py") == ["t.py:2 _state"]
    assert private_reaches("def _helper(): pass\nx = _helper()\n", privates) == []
    assert private_reaches("import torch\ntorch._dynamo.reset()\n", privates) == []
