"""The library's boundaries, checked on its source: where SQL lives, which way imports point, privacy.

Each rule reads the code with `ast`, so a violation anywhere (a lazy import
inside a function included) fails here, not in review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "absorber_memory"
INTEGRATIONS = ROOT / "integrations"
# SQL keywords are written in capitals throughout the library (and prose never starts with one in capitals).
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|PRAGMA|BEGIN|COMMIT|ROLLBACK)\b")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a package folder."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


LIB = modules(LIBRARY)


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _import_time_nodes(module: ast.Module) -> list[ast.AST]:
    """The statements that run when the module is imported (not function bodies, not `if TYPE_CHECKING:`)."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(module.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [h for handler in getattr(node, "handlers", []) for h in handler.body]
    return nodes


def imported(name: str, path: Path, *, lazy: bool = True) -> set[str]:
    """The modules `name` imports, resolved to dotted names: all of them, or (`lazy=False`) at import time only.

    `from . import losses` counts as importing `pkg.losses`, not the package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    module = tree(path)
    for node in ast.walk(module) if lazy else _import_time_nodes(module):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & set(LIB)
            out.update(submodules or {target})
    return out


def library_imports() -> dict[str, set[str]]:
    return {name: {m for m in imported(name, path) if m in LIB and m != name} for name, path in LIB.items()}


def test_sql_appears_only_in_the_store():
    offenders = []
    for name, path in LIB.items():
        if name == "absorber_memory.store":
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                offenders.append(f"{path.name}:{node.lineno}: {node.value[:40]!r}")
    assert offenders == []


def test_the_sql_check_would_see_a_statement():
    assert SQL.match("UPDATE jobs SET status = ?") and SQL.match("  SELECT 1") and not SQL.match("Update the docs")


def test_the_core_never_imports_an_integration():
    for name, path in LIB.items():
        bad = {m for m in imported(name, path) if m.split(".")[0] in ("langchain_absorber", "llama_index", "langchain")}
        assert bad == set(), f"{name} imports {sorted(bad)}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_lazy_imports_included():
    graph = library_imports()
    # A package's __init__ re-exports its modules; a module importing its own package's names is the cycle to catch.
    assert cycles(graph) == []


@pytest.mark.parametrize("light", ["absorber_memory.jobs", "absorber_memory.queue", "absorber_memory.store",
                                   "absorber_memory.layout", "absorber_memory.stream", "absorber_memory.errors",
                                   "absorber_memory.coordinator"])
def test_light_modules_never_import_torch(light):
    """Modules that handle jobs, SQL and paths load no tensor library, even transitively."""
    graph = library_imports()
    seen, todo = set(), [light]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        now = imported(name, LIB[name], lazy=False)
        heavy = {m for m in now if m.split(".")[0] in ("torch", "transformers", "peft")}
        assert heavy == set(), f"{light} reaches {name}, which imports {sorted(heavy)}"
        todo += [m for m in now if m in LIB and m != name]


def _own_private_names(cls: ast.ClassDef) -> set[str]:
    """Private names a class defines for itself: `self._x = ...` in its methods, and `_x` in its body."""
    names = {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
             if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    names |= {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    return {n for n in names if n.startswith("_")}


def private_access(path: Path) -> list[str]:
    """`obj._name` that reaches into another class's private attribute.

    Allowed: `self`/`cls`/`super()` as the object, dunders, and inside a class
    the private names that class defines for its own instances.
    """
    module = tree(path)
    own: dict[int, set[str]] = {}
    for cls in [n for n in ast.walk(module) if isinstance(n, ast.ClassDef)]:
        for inner in ast.walk(cls):
            own.setdefault(id(inner), set()).update(_own_private_names(cls))
    found = []
    for node in ast.walk(module):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        receiver = node.value
        if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
            continue
        if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
            continue
        if node.attr in own.get(id(node), set()):
            continue
        found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


def test_private_access_finder_finds_one(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        "def f(memory):\n    return memory._store\n"
        "class A:\n    def __init__(self):\n        self._x = 1\n"
        "    def copy(self, other):\n        return other._x, other._y, super()._z\n"
    )
    assert private_access(sample) == ["x.py:2: ._store", "x.py:7: ._y"]


def test_library_code_never_reaches_into_another_objects_private_attributes():
    paths = list(LIB.values()) + sorted(INTEGRATIONS.rglob("*.py"))
    offenders = [hit for path in paths for hit in private_access(path)]
    assert offenders == []


def test_integrations_use_only_the_cores_public_modules():
    for path in sorted(INTEGRATIONS.rglob("*.py")):
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("absorber_memory"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.name} imports private names {private}"
                assert node.module in ("absorber_memory", "absorber_memory.chat", "absorber_memory.errors",
                                       "absorber_memory.generation"), f"{path.name} imports {node.module}"


def class_size(path: Path, name: str) -> tuple[int, int]:
    """`(lines, public methods)` of a class."""
    for node in tree(path).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            names = [n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            names += [t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
            return (node.end_lineno or 0) - node.lineno + 1, len([n for n in names if not n.startswith("_")])
    raise AssertionError(f"no class {name} in {path}")


def test_the_session_facade_stays_small():
    lines, public = class_size(LIBRARY / "sessions.py", "AbsorberMemory")
    assert lines <= 286, lines  # 417 lines and 46 methods before the parts were split out; 265 before `recall`, 270 before `export_adapter`, 276 before `consolidate`
    assert public <= 40, public
