"""``klpforge flag-cost``: what a compiler flag (default ``-flive-patching=inline-clone``) costs, function by
function, on objects of a kernel tree.

>>> # klpforge flag-cost -s linux -O build kernel/sched/ --json cost.json --svg charts/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from ..util.fsutil import atomic_write

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``flag-cost`` sub-command."""
    p = subparsers.add_parser(
        "flag-cost", help="what -flive-patching costs, function by function (two compiles per object)",
        description="Compile each object twice with the command Kbuild recorded - as built and with the flag - "
                    "in a private directory, compare the two builds function by function with the diff engine, "
                    "explain every change (inlining, IPA clones, IPA-RA, pure/const/noreturn discovery, "
                    "identical-code folding) and size the live patches each build implies.")
    p.add_argument("-s", "--src", type=Path, metavar="KERNEL_SRC", help="kernel source tree")
    p.add_argument("-O", "--build", type=Path, metavar="BUILD", help="build directory (default: the source tree)")
    p.add_argument("--distro", metavar="debian:RELEASE",
                   help="measure a distribution's configuration (its prepared tree) instead of -s/-O")
    p.add_argument("--flag", default="-flive-patching=inline-clone",
                   help="flag(s) added to the second build, written --flag=-fX (default: %(default)s)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compilers at once")
    p.add_argument("--json", type=Path, metavar="F", help="write the full result as JSON")
    p.add_argument("--svg", type=Path, metavar="DIR", help="write one SVG chart per directory into DIR")
    p.add_argument("--top", type=int, default=25, help="functions listed in the table (default: %(default)s)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the two builds in DIR/built and DIR/flag (for disassembly)")
    p.add_argument("--no-impact", action="store_true", help="skip the impact set sizes")
    p.add_argument("paths", nargs="+", metavar="PATH", help="objects or directories of the tree")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``klpforge flag-cost``; returns the exit code."""
    from ..flagcost import report
    from ..flagcost.run import FlagCostOptions, flag_cost

    if args.distro and (args.src or args.build):
        raise InputError("give either --distro or -s/-O, not both")
    if args.jobs < 1:
        raise InputError("-j must be at least 1")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise InputError(f"--json {args.json}: directory {args.json.parent} does not exist")
    if args.svg is not None and args.svg.exists() and not args.svg.is_dir():
        raise InputError(f"--svg {args.svg}: not a directory")
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            raise InputError(f"--keep {args.keep}: directory is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        args.keep = args.keep.resolve()
    from ..util.termout import PIPE_WIDTH, console, status

    # stdout is the report: a long run says it is still working on stderr, after HEARTBEAT_S seconds only
    with status(console(stderr=True), "flag-cost", "compiling each object twice", out=sys.stderr, announce=False):
        res = flag_cost(FlagCostOptions(src=args.src, build=args.build, paths=args.paths, flag=args.flag,
                                        jobs=args.jobs, distro=args.distro, keep=args.keep,
                                        impact=not args.no_impact))
    tty = sys.stdout.isatty()
    # piped: tables as wide as their content (function names are never cut)
    sys.stdout.write(report.to_text(res, top=args.top, color=tty, width=140 if tty else PIPE_WIDTH))
    if args.json:
        atomic_write(args.json, report.to_json(res))
    if args.svg:
        report.write_svgs(res, args.svg)
    return 0
