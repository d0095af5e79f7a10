"""Reports of a flag-cost run: totals per directory and object, the functions sorted by size growth
(rich table), JSON, and one SVG chart per directory.

The SVG is written with :mod:`xml.etree.ElementTree` (escaping, well-formedness): a horizontal bar per
object, its text growth in bytes and its changed/total functions. Graphviz draws graphs, not bar charts.

>>> summarize([]) == {"functions": 0, "changed": 0, "text_built": 0, "text_flag": 0, "growth": 0,
...                   "clones_built": 0, "clones_flag": 0, "clones_avoided": 0, "reasons": {}}
True
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..util.fsutil import atomic_write
from .measure import FunctionCost, ObjectCost
from .run import FlagCostResult

__all__ = ["summarize", "by_directory", "to_json", "to_text", "write_svgs", "svg_chart"]


def summarize(objs: list[ObjectCost]) -> dict[str, Any]:
    """Totals over ``objs``: functions (``.cold`` parts left out), changed, text bytes, growth, clones."""
    reasons: dict[str, int] = defaultdict(int)
    for o in objs:
        for k, v in o.reason_counts().items():
            if v:
                reasons[k] += v
    tb, tf = sum(o.text_built for o in objs), sum(o.text_flag for o in objs)
    cb, cf = sum(o.clones_built for o in objs), sum(o.clones_flag for o in objs)
    return {"functions": sum(o.total for o in objs), "changed": sum(o.changed for o in objs),
            "text_built": tb, "text_flag": tf, "growth": tf - tb, "clones_built": cb, "clones_flag": cf,
            "clones_avoided": cb - cf, "reasons": dict(sorted(reasons.items()))}


def by_directory(objs: list[ObjectCost]) -> dict[str, list[ObjectCost]]:
    """Objects grouped by their directory (``kernel/sched``)."""
    out: dict[str, list[ObjectCost]] = defaultdict(list)
    for o in objs:
        out[os.path.dirname(o.obj) or "."].append(o)
    return dict(sorted(out.items()))


def _impact(funcs: list[FunctionCost]) -> dict[str, float]:
    fs = [f for f in funcs if f.impact_built or f.impact_flag]
    if not fs:
        return {}
    n = len(fs)
    return {"mean_built": round(sum(f.impact_built for f in fs) / n, 2),
            "mean_built_callers": round(sum(f.impact_built_callers for f in fs) / n, 2),
            "mean_flag": round(sum(f.impact_flag for f in fs) / n, 2),
            "max_built": max(f.impact_built for f in fs), "max_built_callers": max(f.impact_built_callers for f in fs),
            "max_flag": max(f.impact_flag for f in fs),
            "smaller_with_flag": sum(1 for f in fs if f.impact_flag < f.impact_built_callers)}


def _func_json(f: FunctionCost) -> dict[str, Any]:
    d: dict[str, Any] = {"name": f.name, "object": f.obj, "status": f.status, "size_built": f.size_built,
                         "size_flag": f.size_flag, "growth": f.growth,
                         "reasons": [{"kind": r.kind, "detail": r.detail} for r in f.reasons],
                         "impact": {"built": f.impact_built, "built_with_callers": f.impact_built_callers,
                                    "flag": f.impact_flag}}
    if f.built_name:
        d["built_name"] = f.built_name
    return d


def to_json(res: FlagCostResult) -> str:
    """The whole result: totals, per directory, per object, per function (sorted by growth)."""
    dirs = by_directory(res.objects)
    funcs = sorted((f for o in res.objects for f in o.functions), key=lambda f: (-f.growth, f.obj, f.name))
    doc = {
        "flag": res.flag, "src": str(res.src), "build": str(res.build),
        "total": summarize(res.objects) | {"impact": _impact([f for o in res.objects for f in o.functions])},
        "directories": {d: summarize(v) | {"impact": _impact([f for o in v for f in o.functions])}
                        for d, v in dirs.items()},
        "objects": {o.obj: summarize([o]) for o in res.objects},
        "functions": [_func_json(f) for f in funcs],
        "seconds": {"compile": round(res.compile_seconds, 3), "analysis": round(res.analysis_seconds, 3)},
        "compiles": res.compiles,
        "notes": res.notes,
    }
    return json.dumps(doc, indent=1) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * (b - a) / a:+.1f}%" if a else "-"


def to_text(res: FlagCostResult, top: int = 25, width: int = 140, color: bool = False) -> str:
    """Rich tables: per directory and object, then the ``top`` functions by growth with their reasons."""
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=color, color_system="auto" if color else None)
    t = Table(title=f"cost of {res.flag}", title_justify="left")
    for col in ("directory / object", "changed", "functions", "text built", "text flag", "growth", "clones avoided",
                "impact mean built(+callers) -> flag"):
        t.add_column(col, justify="left" if col.startswith("dir") else "right")
    for d, objs in by_directory(res.objects).items():
        s = summarize(objs)
        im = _impact([f for o in objs for f in o.functions])
        t.add_row(f"[bold]{d}/[/bold]", str(s["changed"]), str(s["functions"]), str(s["text_built"]),
                  str(s["text_flag"]), f"{s['growth']:+d} ({_pct(s['text_built'], s['text_flag'])})",
                  str(s["clones_avoided"]),
                  f"{im.get('mean_built', 0)}({im.get('mean_built_callers', 0)}) -> {im.get('mean_flag', 0)}")
        for o in sorted(objs, key=lambda o: -(o.text_flag - o.text_built)):
            t.add_row(f"  {os.path.basename(o.obj)}", str(o.changed), str(o.total), str(o.text_built),
                      str(o.text_flag), f"{o.text_flag - o.text_built:+d}", str(o.clones_avoided), "")
    con.print(t)
    s = summarize(res.objects)
    con.print("changed functions by reason: " + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()))
    funcs = sorted((f for o in res.objects for f in o.functions if f.status != "same"),
                   key=lambda f: (-f.growth, f.obj, f.name))
    ft = Table(title=f"functions by size growth (top {min(top, len(funcs))} of {len(funcs)} changed)",
               title_justify="left")
    for col in ("function", "object", "status", "bytes", "growth", "impact", "why"):
        ft.add_column(col, justify="right" if col in ("bytes", "growth", "impact") else "left",
                      overflow="fold")
    for f in funcs[:top]:
        ft.add_row(f.name, f.obj, f.status, f"{f.size_built} -> {f.size_flag}", f"{f.growth:+d}",
                   f"{f.impact_built}({f.impact_built_callers}) -> {f.impact_flag}",
                   "; ".join(f"{r.kind}: {r.detail}" for r in f.reasons))
    con.print(ft)
    for n in res.notes:
        con.print(f"note: {n}", markup=False)
    con.print(f"{res.compiles} compiles in {res.compile_seconds:.1f} s, analysis {res.analysis_seconds:.1f} s")
    return buf.getvalue()


def svg_chart(directory: str, objs: list[ObjectCost], flag: str) -> str:
    """An SVG bar chart for one directory: one row per object, text growth in bytes (bar) and changed /
    total functions (label)."""
    objs = sorted(objs, key=lambda o: -(o.text_flag - o.text_built))
    row, left, barw, top = 22, 230, 420, 50
    h = top + row * len(objs) + 30
    w = left + barw + 260
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(w), height=str(h),
                     viewBox=f"0 0 {w} {h}", style="font-family: sans-serif; font-size: 12px")
    s = summarize(objs)
    ET.SubElement(svg, "text", x="10", y="20", style="font-size: 15px; font-weight: bold").text = \
        f"{directory}/: cost of {flag}"
    ET.SubElement(svg, "text", x="10", y="38").text = (
        f"text {s['text_built']} -> {s['text_flag']} bytes ({s['growth']:+d}), "
        f"{s['changed']} of {s['functions']} functions changed, {s['clones_avoided']} clones avoided")
    big = max([abs(o.text_flag - o.text_built) for o in objs] + [1])
    zero = left + barw // 2 if any(o.text_flag < o.text_built for o in objs) else left
    scale = (barw // 2 if zero != left else barw) / big
    for i, o in enumerate(objs):
        y = top + i * row
        g = o.text_flag - o.text_built
        ET.SubElement(svg, "text", x=str(left - 8), y=str(y + 15), attrib={"text-anchor": "end"}).text = \
            os.path.basename(o.obj)
        ET.SubElement(svg, "rect", x=f"{zero + min(g, 0) * scale:.1f}", y=str(y + 3),
                      width=f"{max(abs(g) * scale, 1):.1f}", height=str(row - 6),
                      fill="#c0504d" if g > 0 else "#4f81bd")
        ET.SubElement(svg, "text", x=str(left + barw + 8), y=str(y + 15)).text = \
            f"{g:+d} B, {o.changed}/{o.total} changed"
    ET.SubElement(svg, "line", x1=str(zero), y1=str(top), x2=str(zero), y2=str(top + row * len(objs)),
                  stroke="#333")
    return ET.tostring(svg, encoding="unicode") + "\n"


def write_svgs(res: FlagCostResult, out_dir: Path) -> list[Path]:
    """One chart per directory, ``out_dir/<dir with / as _>.svg``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for d, objs in by_directory(res.objects).items():
        p = out_dir / f"{(d.replace('/', '_').strip('_') or 'top')}.svg"
        atomic_write(p, svg_chart(d, objs, res.flag))
        written.append(p)
    return written
