"""The house rules, checked on the source (ast): the core's imports form no cycle and never
name a built-in plugin, no plugin imports another plugin module, a method file stays
readable (at most 150 code lines outside docstrings) and no function grows past 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE, PLUGINS = ROOT / "kdbench", ROOT / "plugins"


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str) -> set[str]:
    """Every module (and module.attribute) ``path`` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph(base: Path, prefix: str) -> dict[str, set[str]]:
    mods = {module_name(p, base): p for p in base.rglob("*.py")}
    return {m: {i for i in imported(p, m) if i in mods and i != m} for m, p in mods.items() if m.startswith(prefix)}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_modules_import_no_cycle():
    assert cycles(graph(ROOT, "kdbench")) == []


def test_core_never_imports_builtin_plugins():
    bad = [m for m, p in ((module_name(p, ROOT), p) for p in CORE.rglob("*.py"))
           if any(i == "kdbench_plugins" or i.startswith("kdbench_plugins.") for i in imported(p, m))]
    assert bad == []


def test_no_plugin_imports_another_plugin_module():
    mods = {module_name(p, PLUGINS): p for p in PLUGINS.rglob("*.py")}
    bad = [(m, i) for m, p in mods.items() for i in imported(p, m)
           if i in mods and i != m and i.count(".") >= 2 and not p.name == "__init__.py"]
    assert bad == []


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not comments, not inside docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
                doc.update(range(first.lineno, first.end_lineno + 1))
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(1 for i, line in enumerate(lines, 1) if i not in doc and line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("path", sorted((PLUGINS / "kdbench_plugins" / "methods").glob("[!_]*.py")), ids=lambda p: p.name)
def test_a_method_file_is_at_most_150_code_lines(path):
    assert code_lines(path) <= 150


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in [*CORE.rglob("*.py"), *PLUGINS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
