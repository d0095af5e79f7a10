"""Render an :class:`~klpforge.ipa.closure.ImpactResult` as a text tree, JSON, or Graphviz.

>>> print(to_json(res))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import run
from .closure import Chain, Entry, ImpactResult, Step

__all__ = ["to_text", "to_json", "to_dot", "write_svg", "relative_paths", "CHAIN_SHOWN"]

#: Steps of a chain shown per function. A longer chain's first steps are the whole chain of the function
#: its first shown step starts from, which the output lists too: named instead of repeated, so the output
#: stays linear in the functions (a 10,000-deep inlining chain printed in full per function was 50
#: million lines). Real kernel chains are a few steps deep (at most 6 for ``get_current`` in 6.1's vmlinux).
CHAIN_SHOWN = 16


def _shown(chain: Chain) -> tuple[int, list[Step]]:
    """(steps left out, the steps shown) of ``chain``."""
    if len(chain) <= CHAIN_SHOWN:
        return 0, chain.steps()
    return len(chain) - CHAIN_SHOWN, chain.tail(CHAIN_SHOWN)


def _elided_text(k: int, first: Step) -> str:
    return (f"... {k} earlier step{'s' if k > 1 else ''}: the chain of `{first.src}` ({first.src_loc}), "
            "listed with it")

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
            k, steps = _shown(e.chain)
            if k:
                out.append(pad + "├── " + _elided_text(k, steps[0]))
            for j, st in enumerate(steps):
                out.append(pad + ("└── " if j == len(steps) - 1 else "├── ") + st.text())
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
            k, steps = _shown(e.chain)
            if k:
                node.add(escape(_elided_text(k, steps[0])))
            for s in steps:
                node.add(escape(s.text()))
        con.print(tree)
    for n in res.notes:
        con.print(f"note: {escape(n)}")
    if fn:
        con.print("replace: " + " ".join(fn))
    return buf.getvalue()


def to_json(res: ImpactResult) -> str:
    """Machine-readable result: queries, functions, entries with chains, notes."""
    entries = []
    as_dict: dict[int, dict[str, str]] = {}  # one dict per Step: steps are shared between chains
    for e in res.entries:
        k, steps = _shown(e.chain)
        chain = []
        for st in steps:
            sd = as_dict.get(id(st))
            if sd is None:
                sd = as_dict[id(st)] = {"kind": st.kind, "src": st.src, "src_loc": st.src_loc, "dst": st.dst,
                                        "dst_loc": st.dst_loc}
            chain.append(sd)
        d: dict[str, object] = {"name": e.name, "loc": e.loc, "obj": e.obj, "status": e.status, "chain": chain}
        if k:  # the chain of chain[0]["src"] comes first: that function's entry has it
            d["chain_elided"] = k
        d.update(transforms=e.transforms, avoided_by=e.avoided_by, pieces=e.pieces, folded=e.folded)
        entries.append(d)
    doc = {"queries": res.queries, "functions": sorted(res.functions), "entries": entries, "notes": res.notes}
    return json.dumps(doc, indent=2) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def relative_paths(res: ImpactResult, root: str) -> ImpactResult:
    """``res`` with the prefix ``root`` (e.g. a distribution tree's source directory, as GCC wrote it into the
    dumps: Kbuild's ``O=`` builds pass absolute source paths) removed from every location and object name.

    Shared chains stay shared (rewritten once each, iteratively: chains can be thousands of steps deep).
    """
    pre = root.rstrip("/") + "/"

    def rel(s: str) -> str:
        return s[len(pre):] if s.startswith(pre) else s

    done: dict[int, Chain] = {}

    def chain(c: Chain) -> Chain:
        todo: list[Chain] = []
        link: Chain | None = c
        while link is not None and link.step is not None and id(link) not in done:
            todo.append(link)
            link = link.parent
        base = done[id(link)] if link is not None and id(link) in done else Chain()
        for node in reversed(todo):
            st = node.step
            assert st is not None
            base = Chain(Step(st.kind, st.src, rel(st.src_loc), st.dst, rel(st.dst_loc)), base)
            done[id(node)] = base
        return done.get(id(c), base)

    ents = [Entry(e.name, rel(e.loc), rel(e.obj), e.status, chain(e.chain), e.transforms, e.avoided_by,
                  e.pieces, e.folded) for e in res.entries]
    return ImpactResult(res.queries, ents, [n.replace(pre, "") for n in res.notes])


#: Node fill colours by status, and what the legend says of each.
_FILL = {"replace": "palegreen", "removed": "lightgrey", "missing": "khaki"}
_LEGEND = (("palegreen", "replace: the live patch replaces it"),
           ("lightgrey", "removed by GCC (no symbol left)"),
           ("khaki", "missing: no symbol, no removal record"),
           ("white", "on the way (not replaced itself)"))


def to_dot(res: ImpactResult, title: str | None = None) -> str:
    """The impact graph: functions as nodes (green = replace), edges labelled with the transform, a title
    (default: the queries) and a legend of the colours and edge labels."""
    head = title if title is not None else f"impact of {', '.join(res.queries)}"
    lines = ["digraph impact {", "  rankdir=LR;", f"  label={_q(head)};", "  labelloc=t;", "  fontsize=18;",
             "  node [shape=box, fontname=monospace];"]
    rows = "".join(f'<TR><TD BGCOLOR="{c}" WIDTH="24"> </TD><TD ALIGN="LEFT">{t}</TD></TR>' for c, t in _LEGEND)
    rows += ('<TR><TD>&rarr;</TD><TD ALIGN="LEFT">edge label: how GCC reached it (inline, constprop, isra, '
             'part, piece ...)</TD></TR>')
    lines += ["  subgraph cluster_legend {", '    label=""; style=dashed;',
              f'    "__legend__" [shape=plaintext, fontname=sans, label=<<TABLE BORDER="0" CELLBORDER="1" '
              f'CELLSPACING="0"><TR><TD COLSPAN="2"><B>legend</B></TD></TR>{rows}</TABLE>>];', "  }"]
    nodes: dict[str, str] = {}
    edges: set[tuple[str, str, str]] = set()
    seen: set[int] = set()  # chain nodes already drawn: shared prefixes are walked once (linear)
    for e in res.entries:
        key = f"{e.name}\n{e.loc}"
        colour = _FILL.get(e.status, "white")
        nodes[key] = colour
        new: list[Step] = []
        link: Chain | None = e.chain
        while link is not None and link.step is not None and id(link) not in seen:
            seen.add(id(link))
            new.append(link.step)
            link = link.parent
        for s in new:
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


def write_svg(res: ImpactResult, out: Path, title: str | None = None) -> None:
    """Render :func:`to_dot` with Graphviz ``dot``; the .dot is written beside when ``dot`` is missing."""
    dot = to_dot(res, title)
    exe = shutil.which("dot")
    if exe is None:
        atomic_write(out.with_suffix(".dot"), dot)
        raise InputError(f"{out}: Graphviz 'dot' is not installed; wrote {out.with_suffix('.dot')} instead")
    p = run([exe, "-Tsvg"], input=dot.encode(), capture_output=True)
    if p.returncode != 0:
        raise InputError(f"{out}: dot failed: {p.stderr.decode(errors='replace').strip()[:200]}")
    atomic_write(out, p.stdout)
