"""The package's layers, checked from its source: no module imports upward, no
two rooms of one layer import each other, no import cycle; and the commands that
only read the cache do not load the FUSE or HTTP stacks.

A module may import what is in its own room (the entry of `LAYERS` it belongs
to) and anything in a lower layer. Every import counts, lazy ones inside
functions too; cycles are looked for among module-level imports (a lazy import
cannot make one at import time).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import modelfs

PACKAGE = Path(modelfs.__file__).parent

# Bottom first. Each inner list is one layer; each name in it is one room
# (a module, or a package with everything under it).
LAYERS: list[list[str]] = [
    ["modelfs"],  # the package's own __init__: its version
    ["modelfs.errors"],
    ["modelfs.types", "modelfs.chunks", "modelfs.redaction", "modelfs.schema"],
    ["modelfs.cache", "modelfs.remote"],
    ["modelfs.fetch"],
    ["modelfs.fs", "modelfs.jobs"],
    ["modelfs.control"],
    ["modelfs.settings"],  # each setting and its default, read from the layers' configs
    ["modelfs.config"],
    ["modelfs.daemon"],
    ["modelfs.progress", "modelfs.cli_cache", "modelfs.demo", "modelfs.testing", "modelfs.spans"],
    ["modelfs.cli"],
    ["modelfs.__main__"],
]


def room_of(module: str) -> tuple[int, str]:
    """(layer, room) of a module: the longest room name that is it or its package."""
    best: tuple[int, str] | None = None
    for level, rooms in enumerate(LAYERS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and \
                    (best is None or len(room) > len(best[1])):
                best = (level, room)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level and not only for type checking)
    for every import of a modelfs module in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names
                             if a.name.split(".")[0] == "modelfs")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "modelfs":
                    continue
                if not child.module:
                    # `from . import x`: x is a module of that package
                    found.extend((f"{target}.{a.name}", child.lineno, top) for a in child.names)
                else:
                    found.append((target, child.lineno, top))
            elif (isinstance(child, ast.If) and _type_checking(child)) or \
                    isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def known_module(target: str) -> str:
    """`target` as a module that exists (an imported name's module, for `from m import name`)."""
    while target:
        if (PACKAGE.parent / target.replace(".", "/")).with_suffix(".py").is_file() or \
                (PACKAGE.parent / target.replace(".", "/") / "__init__.py").is_file():
            return target
        target = target.rpartition(".")[0]
    raise AssertionError("import of a module that does not exist")


def violations(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        name = module_name(path)
        level, room = room_of(name)
        for target, line, _ in imports(path):
            target = known_module(target)
            t_level, t_room = room_of(target)
            if t_room == room:
                continue
            if t_level > level:
                out.append(f"{name}:{line} imports {target}, a layer above it")
            elif t_level == level:
                out.append(f"{name}:{line} imports {target}, a room beside it in its layer")
    return out


def cycles(paths: list[Path]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        graph[name] = {known_module(t) for t, _, top in imports(path) if top} - {name}
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt):], node, nxt] if nxt in stack
                             else [node, nxt])
            elif state.get(nxt) == 0:
                walk(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            walk(node, [])
    # A package's __init__ importing its own modules is not a cycle of theirs.
    return [c for c in found if not all(c[0] == m or m.startswith(c[0] + ".")
                                        or c[0].startswith(m + ".") for m in c)]


def test_no_upward_import_and_no_import_between_rooms_of_a_layer() -> None:
    assert violations(sources()) == []


def test_no_import_cycle() -> None:
    assert cycles(sources()) == []


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: the cache importing the fetch layer is found."""
    bad = PACKAGE / "cache" / "_upward_probe.py"
    bad.write_text("from ..fetch import ChunkReader\n")
    try:
        assert violations([bad]) == [
            "modelfs.cache._upward_probe:1 imports modelfs.fetch, a layer above it"]
    finally:
        bad.unlink()


@pytest.mark.parametrize("argv", [["cache", "ls", "--help"], ["config", "show", "--help"]])
def test_commands_that_read_the_cache_load_neither_fuse_nor_http(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "modelfs", *argv],
                         capture_output=True, text=True, check=True)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
              if line.startswith("import time:")}
    assert "modelfs.cli" in loaded  # the listing is real
    assert not loaded & {"pyfuse3", "httpx", "httpcore", "modelfs.fs.operations"}
