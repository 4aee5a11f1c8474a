"""The package layout stays readable: no import cycles, no cross-module private imports, small files and functions.

These are static checks over the source (``ast``), so they run in milliseconds and name the
offending module, import or function.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxattn"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
#: Functions allowed to be longer, with the reason (keep this short).
LONG_FUNCTION_ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _imports(path: Path, name: str, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every jaxattn import in the file, function bodies included."""
    tree = _tree(path)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "jaxattn":
                    out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "jaxattn":
                continue
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            rest = [n for n in names if f"{mod}.{n}" not in modules]
            for s in subs:
                out.append((s, [], node.lineno))
            if rest:
                out.append((mod, rest, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _, _ in _imports(path, m, names):
            if target in names and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_cross_module_private_imports():
    modules = _modules()
    bad = []
    names_set = set(modules)
    for m, path in modules.items():
        for target, names, line in _imports(path, m, names_set):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [target] if any(p.startswith("_") and p != "__init__" for p in target.split(".")) else []
            if private:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert bad == []


def test_every_module_imports():
    """Every module imports (``__main__`` modules run a program, so they are left out)."""
    import importlib

    for m in _modules():
        if not m.endswith("__main__"):
            importlib.import_module(m)


def test_files_are_small():
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert big == {}


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((prefix + node.name, (node.end_lineno or node.lineno) - node.lineno + 1))
            out += _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, prefix + node.name + ".")
    return out


def test_functions_are_small():
    long = {}
    for p in PACKAGE.rglob("*.py"):
        mod = _module_name(p)
        for fn, n in _functions(_tree(p)):
            qual = f"{mod}.{fn}"
            if n > MAX_FUNCTION_LINES and qual not in LONG_FUNCTION_ALLOWED:
                long[qual] = n
    assert long == {}


@pytest.mark.parametrize("package", sorted(m for m, p in _modules().items() if p.name == "__init__.py"))
def test_packages_declare_all(package):
    """Every package re-exports its public names explicitly, with ``__all__``."""
    import importlib

    mod = importlib.import_module(package)
    assert isinstance(getattr(mod, "__all__", None), (list, tuple)), package
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert missing == []
