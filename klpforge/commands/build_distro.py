"""``klpforge build --distro NAME:RELEASE fix.patch...``: the distribution half of the ``build`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..distro.build import STEPS, DistroBuildOptions, DistroBuildResult, build_distro
from ..distro.symbols import kallsyms_to_readelf
from ..util.termout import status, steps

__all__ = ["run_distro_build", "print_distro_report"]


def print_distro_report(con: Console, res: DistroBuildResult) -> None:
    """Functions per target with sympos, why, and the size proof against the shipped binary."""
    # the title on a line of its own: a table title wraps at the width of the table
    con.print(f"{res.output} ({res.module_name}) for {res.release}", soft_wrap=True, highlight=False, markup=False)
    table = Table()
    for col in ("target", "function", "sympos", "from", "why", "shipped binary"):
        table.add_column(col)
    for o in res.outcomes:
        proof = {v.name: v for v in res.sizes.get(o.obj, [])}
        explained = res.impact.get(o.obj, {}).get("explained", {})
        for f in o.funcs:
            v = proof.get(f.old_name)
            why = f.reason or "changed"
            if f.old_name in explained:
                why += "; " + "; ".join(explained[f.old_name])
            table.add_row(o.target, f.old_name, str(f.sympos), o.obj, why,
                          f"{v.shipped} B, {v.note}" if v else "new")
        for name, why in o.carried.items():
            table.add_row(o.target, name, "-", o.obj, f"carried: {why}", "")
    con.print(table)
    if res.unchanged:
        con.print(f"unchanged objects: {', '.join(res.unchanged)}")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
    for note in res.notes:
        con.print(note, highlight=False, soft_wrap=True)
    signed = ", signed" if res.signed else ""
    con.print(f"[green]built[/] {res.output}{signed}: {res.objects_compiled} objects compiled ({steps})")
    if res.tmpdir:
        con.print(f"temporary files kept in {res.tmpdir}")


def _symbols(path: str | None, tmpdir: Path) -> Path | None:
    """``--symbols``: ELF or readelf text as is; a ``/proc/kallsyms`` capture converted to readelf text."""
    if not path:
        return None
    p = Path(path)
    head = p.read_bytes()[:64]
    if head.startswith(b"\x7fELF") or b"Symbol table" in head or b"Num:" in head:
        return p
    conv = tmpdir / (p.name + ".readelf")
    conv.write_text(kallsyms_to_readelf(p.read_text(errors="replace")))
    return conv


def run_distro_build(args: argparse.Namespace, con: Console) -> int:
    """Run :func:`klpforge.distro.build.build_distro` with a progress bar; report on stderr.

    Several releases (``--distro A,B``) are independent jobs: ``--emit-jobs FILE`` writes their
    list (JSON, ``-`` for stdout) for a CI matrix or Kubernetes; without it they run here one after the other.
    """
    import json
    import sys

    from ..distro.jobs import job_list

    distros = [d for d in (args.distro or "").split(",") if d]
    if args.emit_jobs or len(distros) > 1:
        extra = ["--json", args.json] if args.json else []
        jobs = job_list(distros, list(args.patch), args.output, extra)
        if args.emit_jobs:
            text = json.dumps(jobs, indent=1) + "\n"
            if args.emit_jobs == "-":
                sys.stdout.write(text)
            else:
                from ..util.fsutil import atomic_write

                atomic_write(args.emit_jobs, text)
            return 0
        for job in jobs:
            con.print(f"[bold]{job['distro']}[/] -> {job['output']}", highlight=False)
            args.distro = job["distro"]
            args.output = job["output"]
            _run_one(args, con)
        return 0
    return _run_one(args, con)


def _run_one(args: argparse.Namespace, con: Console) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="klpforge-syms-") as td:
        tree = None
        if not args.distro:
            from ..distro.plain import plain_tree
            from ..util.errors import InputError

            if not args.src:
                raise InputError("the plain form needs -s SRC with -c CONFIG (or -O BUILD)")
            with status(con, "build", "preparing the source tree (once per source and config)"):
                tree = plain_tree(Path(args.src), Path(args.config) if args.config else None,
                                  Path(args.build_dir) if args.build_dir else None, args.release,
                                  Path(args.modules) if args.modules else None,
                                  Path(args.headers) if args.headers else None, jobs=args.jobs)
        opts = DistroBuildOptions(patches=[Path(p) for p in args.patch], distro=args.distro or None,
                                  tree=tree,
                                  output=Path(args.output) if args.output else None, jobs=args.jobs,
                                  replace=not args.no_replace, keep_tmp=args.keep_tmp,
                                  report_json=Path(args.json) if args.json else None,
                                  vmlinux_symbols=_symbols(args.symbols, Path(td)),
                                  symvers=Path(args.symvers) if args.symvers else None,
                                  sign_key=Path(args.sign_key) if getattr(args, "sign_key", None) else None,
                                  sign_cert=Path(args.sign_cert) if getattr(args, "sign_cert", None) else None)
        with steps(con, "build", len(STEPS)) as show:

            def step(name: str, msg: str) -> None:
                show(STEPS.index(name) if name in STEPS else len(STEPS), f"{name}: {msg}")

            res = build_distro(opts, step)
    print_distro_report(con, res)
    return 0
