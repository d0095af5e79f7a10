"""CLI glue for Xen payloads: ``build --xen`` / ``build --distro debian-xen:V`` and ``verify --distro``.

>>> # klpforge build --distro debian-xen:4.17.5+72-g01140da4e8-1 fix.patch -o fix.livepatch
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..qemu.report import report_verify
from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.outputs import check_paths
from ..util.termout import console, status, steps
from .debian import DebianXen
from .pipeline import STEPS as XEN_STEPS
from .pipeline import XenBuildOptions, XenBuildResult, build_xen_payload
from .tree import prepare_tree

__all__ = ["add_build_args", "wants_xen_build", "run_xen_build", "add_verify_args", "wants_xen_verify",
           "run_xen_verify"]


def add_build_args(p: argparse.ArgumentParser) -> None:
    """Xen options of ``klpforge build``."""
    g = p.add_argument_group("Xen hypervisor payloads")
    g.add_argument("--xen", action="store_true", help="build a Xen livepatch payload (-s is the Xen tree)")
    g.add_argument("--xen-config", metavar="CONFIG", help="the running hypervisor's .config (checked)")
    g.add_argument("--xen-syms", metavar="XEN_SYMS", help="the running hypervisor's xen-syms")
    g.add_argument("--distro", metavar="NAME:RELEASE",
                   help="debian:RELEASE (e.g. debian:6.1.0-56-amd64; comma-separate several): a live patch for the "
                        "kernel Debian ships (docs/distro.md); debian-xen:VERSION: fetch Debian's hypervisor, "
                        "symbols and source (cached) and build against them")


def wants_xen_build(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "xen", False) or str(getattr(args, "distro", "") or "").startswith("debian-xen:"))


def _report(con: Console, res: XenBuildResult) -> None:
    # the title on a line of its own: a table title wraps at the width of the table
    con.print(f"{res.output} (build-id {res.build_id})", soft_wrap=True, highlight=False, markup=False)
    t = Table()
    for c in ("function", "old size", "new size"):
        t.add_column(c)
    for f in res.funcs:
        t.add_row(f.name, str(f.old_size), str(f.new_size))
    con.print(t)
    if res.special_kept:
        con.print("special tables: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in res.special_kept.items()))
    if res.hooks:
        con.print(f"hooks: {', '.join(res.hooks)}")
    if res.unchanged:
        con.print(f"unchanged objects: {', '.join(res.unchanged)}")
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
    con.print(f"[green]built[/] {res.output} in {sum(res.timings.values()):.1f} s ({steps})")
    if res.tmpdir:
        con.print(f"temporary files kept in {res.tmpdir}")


def run_xen_build(args: argparse.Namespace) -> int:
    """``build --xen`` (own tree) or ``build --distro debian-xen:V`` (Debian's, cached)."""
    con = console(stderr=True)
    if args.distro:
        d = DebianXen.parse(args.distro)
        with status(con, "build", f"fetching Debian's Xen {d.version}"):
            b = d.fetch_binaries()
        if args.src:
            src = Path(args.src)
        else:
            with status(con, "build", "fetching the Debian source; building the hypervisor once (cached)"):
                src = prepare_tree(d.fetch_source(), b.config, d.dir, jobs=args.jobs,
                                   log=lambda m: con.print(m, highlight=False)).root
        syms: Path = b.xen_syms
        config: Path | None = b.config
    else:
        if not args.src or not args.xen_syms:
            raise InputError("--xen needs -s XEN_SRC (a built Xen tree) and --xen-syms XEN_SYMS")
        src, syms = Path(args.src), Path(args.xen_syms)
        config = Path(args.xen_config) if args.xen_config else None
        # a FIFO or a device is refused before any work; a missing file is named by the pipeline, after the tree
        check_paths({}, {k: p for k, p in (("--xen-syms", syms), ("--xen-config", config)) if p and p.exists()})
    opts = XenBuildOptions(src=src, patch=Path(args.patch), xen_syms=syms,
                           output=Path(args.output) if args.output else None, config=config,
                           keep_tmp=args.keep_tmp)
    with steps(con, "build", len(XEN_STEPS)) as show:
        res = build_xen_payload(opts, lambda s, m: show(XEN_STEPS.index(s) if s in XEN_STEPS else 0, m))
    _report(con, res)
    if args.json:
        import json
        atomic_write(args.json, json.dumps({
            "output": str(res.output), "build_id": res.build_id, "objects": res.objects,
            "funcs": [f.__dict__ for f in res.funcs], "timings": res.timings, "hooks": res.hooks,
            "special_sections": {k: {"kept": v[0], "total": v[1]} for k, v in res.special_kept.items()},
        }, indent=2) + "\n")
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    """Xen options of ``klpforge verify``."""
    p.add_argument("--distro", metavar="NAME:RELEASE",
                   help="debian:RELEASE: boot the kernel Debian ships (docs/distro.md); debian-xen:VERSION: boot "
                        "Debian's Xen and dom0 under QEMU and load the payload with xen-livepatch")


def wants_xen_verify(args: argparse.Namespace) -> bool:
    return str(getattr(args, "distro", "") or "").startswith("debian-xen:")


def run_xen_verify(args: argparse.Namespace) -> int:
    """Boot, upload, apply, check, revert, unload; each step printed; console kept on failure."""
    from .verify import XenVerifySpec, verify_payload
    con = console(stderr=True)
    d = DebianXen.parse(args.distro)
    with status(con, "verify", f"fetching Debian's Xen {d.version}"):
        b = d.fetch_binaries()
    payload = Path(args.module)
    spec = XenVerifySpec(payload=payload, bins=b, check=args.check, expect=args.expect,
                         timeout=max(args.timeout, 300.0), before_check=args.before_check,
                         after_check=args.after_check, after_expect=args.after_expect)
    with status(con, "verify", f"booting Xen {d.version} with {payload.name} under QEMU"):
        res = verify_payload(spec, Path(args.console_log) if args.console_log else None)
    outs = [("before", res.before_output), ("check", res.check_output), ("after", res.after_output)]
    return report_verify(con, res, payload, args.console_log, outs, name_width=9)
