"""The package's import graph: no cycles (function-local imports included) and the public names import.

An edge is an import statement (or `importlib.import_module("literal")`) anywhere in a module. Python also runs
the parent packages' `__init__` before a submodule; that implicit step is not an edge, or every package whose
`__init__` re-exports its submodules would form a cycle with each of them.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.sweep.isolated import CHILD_MODULE

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench", "widgets")


def _module_name(path: Path, root: Path) -> str:
    """`workbench/cli/run.py` -> `workbench.cli.run`; a package's `__init__.py` is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[_module_name(path, root)] = path
    return found


def _resolve_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative levels resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _internal(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest project module `name` denotes (`a.b.c` where only `a.b` is a module -> `a.b`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module name an AST imports, anywhere in the file (functions, methods, `if` blocks, ...).

    `from pkg import name` yields `pkg.name`, which resolves to the submodule when `name` is one and to
    `pkg` (its `__init__`) otherwise; `importlib.import_module("literal")` counts as an import too.
    """
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(node, module, is_package)
            names.extend(f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (each import resolved to the module that defines it)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = {_internal(name, modules) for name in _imported_names(tree, module, is_package)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """One cycle's members and the imports between them."""
    members = set(component)
    edges = [f"    {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"  {{{', '.join(component)}}}\n" + "\n".join(edges)


def test_cycle_finder_sees_a_function_local_cycle(tmp_path):
    """The walker counts imports inside functions and relative ones, so a cycle they hide is found."""
    pkg = tmp_path / "workbench"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from workbench import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def g():\n    import workbench.a\n")
    (pkg / "d.py").write_text("from workbench.sub.c import g\n")
    (tmp_path / "widgets").mkdir()
    graph = import_graph(tmp_path)
    assert graph["workbench.b"] == {"workbench.sub.c"}
    assert cycles(graph) == [["workbench.a", "workbench.b", "workbench.sub.c"]]


def test_no_import_cycles():
    """No module reaches itself through the imports it makes, however deep in a function they sit."""
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, graph) for c in found)


@pytest.mark.parametrize(
    "statement",
    [
        "import workbench",
        "from workbench.config import RunConfig",
        "from workbench.runner import run",
        "from workbench.store import Store",
        "from workbench.cli import main",
        "from widgets import Workbench",
    ],
)
def test_public_names_import(statement):
    """Each public name imports in a fresh interpreter (no other test's imports paper over an order bug)."""
    done = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_console_command():
    """pyproject's `workbench` script names an importable `main`; `python -m workbench --help` exits 0."""
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["workbench"]
    module, _, attr = target.partition(":")
    check = f"from {module} import {attr}; assert callable({attr})"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0, target
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout


@pytest.mark.parametrize("entry", [CHILD_MODULE, "workbench.parallel.worker"])
def test_process_entry_modules_are_imported_by_no_module(entry):
    """A module started with `python -m` that its package already imported would run twice (runpy warns)."""
    graph = import_graph()
    assert entry in graph
    assert [m for m, deps in graph.items() if entry in deps] == []


def test_the_dashboard_finds_what_it_names_after_the_move():
    """The dashboard notebook, its Voila config folder and the kernel manager class it names to Voila exist."""
    from workbench.serve import dashboard

    assert dashboard.NOTEBOOK.is_file()
    assert (dashboard.VOILA_CONFIG / "voila.py").is_file()
    pytest.importorskip("jupyter_server")
    module, _, name = dashboard.KERNEL_MANAGER.rpartition(".")
    assert hasattr(importlib.import_module(module), name)
