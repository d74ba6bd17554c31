"""The house rules of `consumer/`: imports go one way (tagging <- service <- tools <- cli),
and no module imports itself back through others (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "consumer"
# what each package may import of `consumer`
ALLOWED = {
    "tagging": {"tagging"},
    "service": {"tagging", "service"},
    "tools": {"tagging", "service", "tools"},
    "cli": {"tagging", "service", "tools", "cli"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every `consumer.*` module each module imports, at any depth of its code."""
    graph: dict[str, set[str]] = {}
    modules = {_module(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from pkg import submodule` imports the submodule, not the package's code
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [n if n in modules else node.module for n in subs]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n in modules}
        graph[_module(path)] = found - {_module(path)}
    return graph


def test_every_module_lives_in_a_package_that_says_its_job() -> None:
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside tagging/, service/, tools/, cli/: {loose}"


def test_imports_go_one_way() -> None:
    wrong = [
        (mod, dep)
        for mod, deps in _imports().items()
        for dep in deps
        if mod.count(".") >= 1
        and dep.count(".") >= 1
        and dep.split(".")[1] not in ALLOWED[mod.split(".")[1]]
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _imports()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                cycles.append([*path[path.index(dep) :], dep])
            elif len(path) < 12:
                visit(dep, [*path, dep])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == [], cycles[:3]
