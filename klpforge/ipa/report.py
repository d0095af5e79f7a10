"""Render an :class:`~klpforge.ipa.closure.ImpactResult` as a text tree, JSON, or Graphviz.

>>> print(to_json(res))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_write
from ..proc import run
from .closure import ImpactResult

__all__ = ["to_text", "to_json", "to_dot", "write_svg"]

_STATUS = {"replace": "[bold green]replace[/]", "removed": "[dim]removed[/]",
           "missing": "[yellow]missing, no removal record[/]", "unknown": "[dim]no symbol table[/]"}


_PLAIN = {"replace": "replace", "removed": "removed", "missing": "missing, no removal record",
          "unknown": "no symbol table"}


def to_text(res: ImpactResult, width: int = 110, color: bool = False) -> str:
    """A tree per object: each reached function with its status and chain of reasons.

    Without colour the tree is drawn directly (rich takes seconds on the 5,000 entries of ``get_current``).
    """
    if color:
        return _rich_text(res, width)
    fn = sorted(res.functions)
    out = [f"impact of {', '.join(res.queries)}: {len(fn)} function(s) to replace"]
    by_obj: dict[str, list] = {}
    for e in res.entries:
        by_obj.setdefault(e.obj, []).append(e)
    for obj in sorted(by_obj):
        out.append(obj)
        ents = sorted(by_obj[obj], key=lambda e: (len(e.chain), e.name))
        for i, e in enumerate(ents):
            last = i == len(ents) - 1
            label = f"{e.name} ({e.loc}): {_PLAIN[e.status]}"
            if e.pieces:
                label += f", with {', '.join(e.pieces)}"
            if e.folded:
                label += f"; shares its address with {', '.join(e.folded)} (identical code folding)"
            if e.avoided_by:
                label += f"  avoided by -flive-patching={'/'.join(e.avoided_by)}"
            out.append(("└── " if last else "├── ") + label)
            pad = "    " if last else "│   "
            for j, st in enumerate(e.chain):
                out.append(pad + ("└── " if j == len(e.chain) - 1 else "├── ") + st.text())
    out += [f"note: {n}" for n in res.notes]
    if fn:
        out.append("replace: " + " ".join(fn))
    return "\n".join(out) + "\n"


def _rich_text(res: ImpactResult, width: int) -> str:
    """:func:`to_text` with colours, drawn by rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=True, color_system="standard", highlight=False)
    fn = sorted(res.functions)
    con.print(f"[bold]impact of {', '.join(res.queries)}[/]: {len(fn)} function(s) to replace")
    by_obj: dict[str, list] = {}
    for e in res.entries:
        by_obj.setdefault(e.obj, []).append(e)
    for obj in sorted(by_obj):
        tree = Tree(f"[bold]{escape(obj)}[/]")
        for e in sorted(by_obj[obj], key=lambda e: (len(e.chain), e.name)):
            label = f"{escape(e.name)} ({escape(e.loc)}): {_STATUS[e.status]}"
            if e.pieces:
                label += f", with {escape(', '.join(e.pieces))}"
            if e.folded:
                label += f"; shares its address with {escape(', '.join(e.folded))} (identical code folding)"
            if e.avoided_by:
                label += f"  [cyan]avoided by -flive-patching={'/'.join(e.avoided_by)}[/]"
            node = tree.add(label)
            for s in e.chain:
                node.add(escape(s.text()))
        con.print(tree)
    for n in res.notes:
        con.print(f"note: {escape(n)}")
    if fn:
        con.print("replace: " + " ".join(fn))
    return buf.getvalue()


def to_json(res: ImpactResult) -> str:
    """Machine-readable result: queries, functions, entries with chains, notes."""
    doc = {"queries": res.queries, "functions": sorted(res.functions),
           "entries": [asdict(e) for e in res.entries], "notes": res.notes}
    return json.dumps(doc, indent=2) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(res: ImpactResult) -> str:
    """The impact graph: functions as nodes (green = replace), edges labelled with the transform."""
    lines = ["digraph impact {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    nodes: dict[str, str] = {}
    edges: set[tuple[str, str, str]] = set()
    for e in res.entries:
        key = f"{e.name}\n{e.loc}"
        colour = {"replace": "palegreen", "removed": "lightgrey", "missing": "khaki"}.get(e.status, "white")
        nodes[key] = colour
        for s in e.chain:
            a, b = f"{s.src}\n{s.src_loc}", f"{s.dst}\n{s.dst_loc}"
            nodes.setdefault(a, "white")
            nodes.setdefault(b, "white")
            edges.add((a, b, s.kind))
        for p in e.pieces:
            nodes.setdefault(p, "palegreen")
            edges.add((key, p, "piece"))
        for p in e.folded:  # a separate function at the same address, not replaced by this entry
            nodes.setdefault(p, "white")
            edges.add((key, p, "same address (ICF)"))
    for k, c in sorted(nodes.items()):
        lines.append(f"  {_q(k)} [style=filled, fillcolor={c}];")
    for a, b, k in sorted(edges):
        lines.append(f"  {_q(a)} -> {_q(b)} [label={_q(k)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_svg(res: ImpactResult, out: Path) -> None:
    """Render :func:`to_dot` with Graphviz ``dot``; the .dot is written beside when ``dot`` is missing."""
    dot = to_dot(res)
    exe = shutil.which("dot")
    if exe is None:
        atomic_write(out.with_suffix(".dot"), dot)
        raise InputError(f"{out}: Graphviz 'dot' is not installed; wrote {out.with_suffix('.dot')} instead")
    p = run([exe, "-Tsvg"], input=dot.encode(), capture_output=True)
    if p.returncode != 0:
        raise InputError(f"{out}: dot failed: {p.stderr.decode(errors='replace').strip()[:200]}")
    atomic_write(out, p.stdout)
