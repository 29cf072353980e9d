"""The package's layout, read from its source: no import circle (module-level imports and
the ones inside functions alike), and no module importing another module's underscore
names (the package's own extension, ``_native``/``_core``, aside)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import parallel_gen

ROOT = Path(parallel_gen.__file__).resolve().parent
PACKAGE = ROOT.name
ALLOWED_PRIVATE = {"_native", "_core"}


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()
EXTENSIONS = {f"{PACKAGE}.{p.name.split('.')[0]}" for p in ROOT.glob("*.so")}  # _core: imports nothing of ours


def _imports(module: str, path: Path) -> Iterator[Tuple[str, List[str], int]]:
    """(module imported, the names taken from it, line) of every import in ``path``, at any
    depth, except those under ``if TYPE_CHECKING:`` (never run)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(nodes: List[ast.stmt]) -> Iterator[ast.AST]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                yield from walk(node.orelse)
                continue
            yield node
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from walk([child])

    for node in walk(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            yield base, [a.name for a in node.names], node.lineno


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names, _ in _imports(module, path):
            for t in [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES.keys() | EXTENSIONS] or [target]:
                if t in EXTENSIONS:
                    continue
                while t and t not in MODULES:
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
    return graph


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert len(graph) > 50 and graph[f"{PACKAGE}.generate"]  # it read the package
    done: Set[str] = set()

    def visit(node: str, path: List[str]) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            raise AssertionError(f"import circle: {' -> '.join(cycle)}")
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in ALLOWED_PRIVATE


def test_no_module_imports_another_modules_underscore_names():
    found = []
    for module, path in MODULES.items():
        for target, names, line in _imports(module, path):
            private = [n for n in names + target.split(".") if _private(n)]
            if private:
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {target} {private}")
    assert not found, "\n".join(found)


# What the core may import besides itself: the shared types, never a surface.
CORE_MAY_IMPORT = {"config", "params", "results", "errors", "model", "tools", "_native", "constraints", "templates"}


def test_the_core_imports_no_surface():
    """parallel_gen.core (client, runner, events, inputs, collector) is what every surface
    (generate, chat, streams, jobs, the server, Ray, ...) sits on: it imports none of them."""
    graph = _graph()
    core = [m for m in graph if m.startswith(f"{PACKAGE}.core")]
    assert {f"{PACKAGE}.core.{m}" for m in ("client", "runner", "events", "inputs", "collector")} <= set(core)
    bad = []
    for module in core:
        for target in graph[module]:
            top = target.split(".")[1] if target.count(".") else ""
            if top != "core" and top not in CORE_MAY_IMPORT:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_public_name_is_also_a_submodule():
    """pg.classify is a function; a submodule of the same name would replace it on the
    package once imported (the module is classification.py)."""
    top = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert not set(parallel_gen.__all__) & top
    importlib.import_module("parallel_gen.classification")  # binds the submodule on the package

    assert callable(parallel_gen.classify) and parallel_gen.classify.__name__ == "classify"


def test_no_module_name_is_another_ones_plural():
    """model.py (the Model) beside models.py (the packaged files) read as one thing in two
    places: sibling modules differ by more than an "s" (the files are model_files.py)."""
    names = {name for name in MODULES if name.count(".") >= 1}
    assert f"{PACKAGE}.model" in names and f"{PACKAGE}.model_files" in names  # it read the package
    assert sorted(n for n in names if n + "s" in names) == []
