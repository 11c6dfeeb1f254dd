"""The layer table of docs/architecture.md holds for every import in src/tele, and no two modules
import each other (directly or round a longer loop), lazy imports inside functions included.

Both read the source with `ast`, so nothing is imported and every `import` statement counts,
whether at the top of a module, inside a function or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PAGE = ROOT / "docs" / "architecture.md"

KNOWN_CYCLES: dict[frozenset[str], str] = {}
"""Cycles that exist today, each with the work that removes it. The test fails when one of
them grows, when a new one appears, and when one is gone (then delete its entry here)."""


@dataclass(frozen=True)
class Import:
    module: str
    target: str
    line: int


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in sorted((SRC / "tele").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _owning_module(name: str) -> str | None:
    """The module that `import name` runs last: `name` itself, or the package above a name
    that is an attribute (`from tele.x import SomeClass` -> tele.x)."""
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                names = [f"{source}.{alias.name}" for alias in node.names]
                names = [n if n in MODULES else source for n in names]
            else:
                continue
            for name in names:
                target = _owning_module(name)
                if target is not None and target != module:
                    yield Import(module, target, node.lineno)


IMPORTS = list(_imports())


def _layer_table() -> dict[str, set[str]]:
    """`unit -> allowed, ...` lines from the page's block between the layer-table markers."""
    text = PAGE.read_text()
    match = re.search(r"<!-- layer-table -->\s*```text\n(.*?)```", text, re.DOTALL)
    assert match, f"{PAGE} has no layer table (a ```text block after <!-- layer-table -->)"
    table: dict[str, set[str]] = {}
    for raw in match.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        unit, _, allowed = line.partition("->")
        unit = unit.strip()
        assert unit not in table, f"{unit} appears twice in the layer table"
        table[unit] = {a.strip() for a in allowed.split(",") if a.strip()}
    return table


TABLE = _layer_table()


def _within(name: str, unit: str) -> bool:
    full = f"tele.{unit}"
    return name == full or name.startswith(full + ".")


def _unit_of(module: str) -> str | None:
    """The most specific table entry that `module` belongs to."""
    units = [u for u in TABLE if _within(module, u)]
    return max(units, key=len) if units else None


def _allowed(module: str, target: str) -> bool:
    top = module.split(".")[1] if module != "tele" else ""
    if target == "tele" or _within(target, top):
        return True  # the package root (__version__), and a package's own modules
    rules = set().union(*(TABLE[u] for u in TABLE if _within(module, u)))
    return any(_within(target, allowed) for allowed in rules)


def test_every_module_has_a_place_in_the_table() -> None:
    unplaced = sorted(m for m in MODULES if m != "tele" and _unit_of(m) is None)
    assert unplaced == [], f"add these to the layer table in {PAGE.name}: {unplaced}"


def test_the_table_names_only_what_exists() -> None:
    planned: set[str] = set()
    names = set(TABLE) | set().union(*TABLE.values())
    missing = sorted(
        n
        for n in names
        if n.split(".")[0] not in planned and not any(_within(m, n) for m in MODULES)
    )
    assert missing == [], f"the layer table names modules that do not exist: {missing}"


def test_every_import_follows_the_layer_table() -> None:
    wrong = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if not _allowed(i.module, i.target)
    ]
    assert wrong == [], (
        f"imports against the layer table of {PAGE.name} (move the shared part down, or change "
        "the table and say why on the page):\n" + "\n".join(wrong)
    )


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        edges[i.module].add(i.target)
        # Importing tele.a.b runs tele.a's __init__ first.
        parent = i.target
        while parent.count(".") > 1:
            parent = parent.rsplit(".", 1)[0]
            if parent != i.module and not i.module.startswith(parent + "."):
                edges[i.module].add(parent)
    return edges


def test_no_import_cycles() -> None:
    cycles = _cycles(_import_graph())
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert new == [], f"modules that import each other (lazy imports count): {new}"
    gone = [why for c, why in KNOWN_CYCLES.items() if c not in cycles]
    assert gone == [], f"these cycles are gone, delete them from KNOWN_CYCLES: {gone}"


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [frozenset({"a", "b"})]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [frozenset({"a", "b", "c"})]),
    ],
)
def test_the_cycle_finder_finds_loops(
    edges: dict[str, set[str]], expected: list[frozenset[str]]
) -> None:
    assert _cycles(edges) == expected


def test_a_lazy_import_against_the_table_is_seen() -> None:
    # The rule catches imports inside functions too: net/ may import nothing of tele.
    assert not _allowed("tele.net.tcp", "tele.rpc.h2link")
    assert _allowed("tele.net.tcp", "tele.net.ip")
    assert any(i.module == "tele.cli.basic" and i.target == "tele.rpc.daemon_api" for i in IMPORTS)
