"""Human summary of a diff on stdout (rich), beside the JSON report.

>>> print_summary(result)   # doctest: +SKIP
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..util.termout import console as termout_console
from .run import DiffResult

__all__ = ["print_summary"]


def print_summary(res: DiffResult, console: Console | None = None) -> None:
    """Changed, new and included functions, each with why, and the klp relocation count."""
    con = console or termout_console(highlight=False)  # not cut to 80 columns when piped
    rep = res.report
    con.print(f"[bold]{rep['arch']}[/] {rep['orig']} -> {rep['patched']} (target {rep['target']})")
    t = Table("symbol", "kind", "why it is in the live patch", box=None, pad_edge=False)
    for inc in rep["included"]:
        t.add_row(inc["name"], inc["type"], inc["why"])
    con.print(t)
    if rep["line_only"]:
        con.print(f"ignored (only __LINE__ moved): {', '.join(rep['line_only'])}")
    for w in rep["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")
    pf = ", ".join(f"{f.old_name}" + (f",{f.sympos}" if f.sympos else "") for f in res.patched_functions)
    con.print(f"replaces: {pf or '(nothing: new code only)'}")
    con.print(f"{len(res.klp_relocs)} klp relocation(s), {len(rep['normal_externals'])} exported symbol(s) used; "
              + ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in rep["special_sections"].items()))
    if "impact" in rep:  # klpforge diff --impact: a few lines from klpforge/diff/impact_check.py
        from .impact_check import summary_lines
        for line in summary_lines(rep["impact"]):
            con.print(line, markup=False)
