"""The package layout of issue 21: the diff engine's modules are its stages, imports point only down.

The import graph is computed from the source (``ast``, every ``import``/``from`` statement, those inside
functions and ``TYPE_CHECKING`` blocks included), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "klpforge"

#: The diff engine's modules by rank: a module may import modules of its own rank or lower only.
#: Shared layers first, then the stages in pipeline order, then the driver.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("names", ("secnames", "names", "arch", "disasm")),
    ("read", ("model", "symtab", "pcrel", "dwarfread")),
    ("correlate", ("correlation", "correlate", "statics")),
    ("compare", ("compare", "reloc_keys", "lineargs", "sharedsec", "layout")),
    ("select", ("select", "icf", "ftrace_entry")),
    ("emit", ("emit",)),
    ("driver", ("run", "report", "impact_check", "")),
]
#: What the engine may import from the rest of klpforge (``ipa``: only ``diff --impact``'s check).
ENGINE_MAY_USE = ("klpforge.elf", "klpforge.util", "klpforge.ipa")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Module -> {(imported module, names imported from it)}, klpforge modules only, relative imports
    resolved; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    mods = _modules()
    graph: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        out: set[tuple[str, tuple[str, ...]]] = set()
        for n in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(n, ast.Import):
                out |= {(a.name, ()) for a in n.names if a.name.split(".")[0] == "klpforge"}
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module or ""
                if target.split(".")[0] != "klpforge":
                    continue
                plain = [a.name for a in n.names if f"{target}.{a.name}" not in mods]
                out |= {(f"{target}.{a.name}", ()) for a in n.names if f"{target}.{a.name}" in mods}
                if plain:
                    out.add((target, tuple(plain)))
        graph[m] = out
    return graph


def _edges(graph: dict[str, set]) -> dict[str, set[str]]:
    return {m: {t for t, _ in v if t != m} for m, v in graph.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle (a list of modules), or [] (iterative DFS, white/grey/black)."""
    color: dict[str, int] = {}
    for root in sorted(edges):
        if color.get(root):
            continue
        stack = [(root, iter(sorted(edges.get(root, ()))))]
        path = [root]
        color[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
            elif color.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not color.get(nxt):
                color[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(edges.get(nxt, ())))))
    return []


def _rank(mod: str) -> int:
    rest = mod.removeprefix("klpforge.diff").removeprefix(".").split(".")[0]
    for i, (_, names) in enumerate(STAGES):
        if rest in names:
            return i
    raise AssertionError(f"{mod}: not placed in a stage of the diff engine (add it to STAGES)")


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a made-up graph with a loop through three modules is caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_klpforge() -> None:
    cyc = _cycle(_edges(import_graph()))
    assert not cyc, "import cycle: " + " -> ".join(cyc)


def test_engine_stages_import_only_downward() -> None:
    graph = import_graph()
    bad = []
    for m, imports in graph.items():
        if not (m == "klpforge.diff" or m.startswith("klpforge.diff.")):
            continue
        for t, _ in imports:
            if t == "klpforge.diff" or t.startswith("klpforge.diff."):
                if _rank(t) > _rank(m):
                    bad.append(f"{m} ({STAGES[_rank(m)][0]}) imports {t} ({STAGES[_rank(t)][0]})")
            elif not t.startswith(ENGINE_MAY_USE):
                bad.append(f"{m} imports {t}, outside the engine's lower layers")
            elif t.startswith("klpforge.ipa") and not m.endswith("impact_check"):
                bad.append(f"{m} imports {t}: only impact_check may use the impact analysis")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("lower", ["klpforge.util", "klpforge.elf"])
def test_lower_layers_import_nothing_above_them(lower: str) -> None:
    allowed = {"klpforge.util": ("klpforge.util",), "klpforge.elf": ("klpforge.elf", "klpforge.util")}[lower]
    bad = [f"{m} imports {t}" for m, imports in import_graph().items() if m.startswith(lower)
           for t, _ in imports if t != "klpforge" and not t.startswith(allowed)]
    assert not bad, "\n".join(bad)


def test_no_private_name_imported_across_engine_modules() -> None:
    bad = [f"{m} imports {', '.join(n for n in names if n.startswith('_'))} from {t}"
           for m, imports in import_graph().items()
           if m.startswith(("klpforge.diff", "klpforge.util", "klpforge.xen.emit"))
           for t, names in imports if any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not bad, "\n".join(bad)


def test_every_engine_module_has_a_stage() -> None:
    for m in _modules():
        if m.startswith("klpforge.diff"):
            _rank(m)  # raises for an unplaced module
