"""The package's import graph, read from the source with ast: no module imports, through any
chain of modules, one that imports it back, and the layers import downwards only. Imports inside
functions count as much as those at the top of a module: they run later, but they tie the
modules together all the same, and so do imports under `if TYPE_CHECKING:` (a module that
needs another's class only to annotate a callback describes what it uses as a Protocol instead)."""

from __future__ import annotations

import ast
from pathlib import Path

import splitfed

PACKAGE = Path(splitfed.__file__).parent
COMMAND_LINE = {"cli", "commandline", "sizing_cli", "attack_cli", "__main__"}
# area of the package -> the areas it must never import
FORBIDDEN = {
    **dict.fromkeys(("learning", "protocol", "security", "observability"), {"roles", "scenarios", "cluster", *COMMAND_LINE}),
    "roles": {"scenarios", "cluster", *COMMAND_LINE},
    "transport": {"roles"},
}


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source: `import a.b`,
    `from a import b` (the module a.b where there is one, else a), relative or absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x (level 1: this package), from ..x (its parent)...
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (Tarjan's strongly
    connected components, then the shortest way back to the group's first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for group in groups:
        start = min(group)
        came_from: dict[str, str | None] = {start: None}
        queue = [start]
        for node in queue:  # breadth first, inside the group, to a module that imports `start`
            if start in graph[node]:
                break
            for target in sorted(graph[node] & group):
                if target not in came_from:
                    came_from[target] = node
                    queue.append(target)
        path = [node]
        while (previous := came_from[path[-1]]) is not None:
            path.append(previous)
        found.append(path[::-1] + [start])
    return found


def chains(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or through others, with the shortest chain to it."""
    found = {start: [start]}
    queue = [start]
    for node in queue:
        for target in sorted(graph[node]):
            if target not in found:
                found[target] = found[node] + [target]
                queue.append(target)
    del found[start]
    return found


def area(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The walk itself: absolute and relative, at the top and in a function, a submodule named in
    `from ... import`, and a name that is not a module counting as its module."""
    source = tmp_path / "s.py"
    source.write_text(
        "import p.a\n"
        "from p.b import c\n"
        "from p import d, e_name\n"
        "from .f import thing\n"
        "from . import g\n"
        "def later():\n"
        "    from .. import outside\n"
        "    from p.i import j\n"
        "if TYPE_CHECKING:\n"
        "    from p.k import annotation_only\n"
    )
    modules = {"p.a", "p.b", "p.b.c", "p.d", "p.f", "p.g", "p.i", "p.k", "p.s"}
    assert imports_of("p.s", source, modules | {"p"}) == {"p", "p.a", "p.b.c", "p.d", "p.f", "p.g", "p.i", "p.k"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert chains({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b": ["a", "b"], "c": ["a", "b", "c"]}
    graph = import_graph()
    assert "splitfed.cluster.commands" in graph["splitfed.cli"]
    assert "splitfed.roles.service" in graph["splitfed.commandline"]  # imported in a function
    assert "splitfed.cluster.values" in graph["splitfed.cluster.commands"]  # `from splitfed.cluster import values as chart`


def test_no_module_imports_itself_back():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_layers_import_downwards_only():
    """Directly or through other modules: a chain through a module of no layer counts too."""
    graph = import_graph()
    wrong = [" -> ".join(chain) for module in sorted(graph) if area(module) in FORBIDDEN
             for target, chain in chains(graph, module).items() if area(target) in FORBIDDEN[area(module)]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)
