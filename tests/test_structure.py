"""The shape of the code: no import cycles (imports inside functions count) and no module over 500
lines in st_sdk/ (docs/architecture.md explains the layering these keep)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package name it is installed as
PACKAGES = {"st_sdk": "st_sdk", "backends": "st_sdk_backends"}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str], defined: dict[str, set[str]] | None = None) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions included). `from P import x`
    imports P.x when that is a module, else P, unless P is a package that does not define x (a
    compiled extension module, which imports nothing back). `defined`: package -> its top-level names."""
    is_pkg = path.name == "__init__.py"
    defined = defined or {}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names
                       if f"{mod}.{a.name}" in known or mod not in defined or a.name in defined[mod]]
        else:
            continue
        for t in targets:
            while t and t not in known:   # `import a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names |= {t.id for t in ast.walk(node) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    defined = {name: top_level_names(path) for name, path in mods.items() if path.name == "__init__.py"}
    graph = {name: imports(name, path, set(mods), defined) for name, path in mods.items()}
    assert sum(len(v) for v in graph.values()) > 100     # the parser sees the imports at all
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import x\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imports("p.a", a, known), "p.b": imports("p.b", b, known)}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_no_core_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "st_sdk").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
