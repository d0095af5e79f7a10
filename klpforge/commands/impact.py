"""``klpforge impact``: which functions must a live patch replace, given what GCC inlined and cloned.

>>> # klpforge impact --dumps build/ helper
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..outputs import atomic_write, check_paths

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``impact`` sub-command."""
    p = subparsers.add_parser(
        "impact", help="functions a live patch must replace (from -fdump-ipa-clones dumps)",
        description="Compute the functions a live patch must replace when FUNC... (or the functions a patch "
                    "touches) change: inlined copies, IPA clones and their callers, cold parts and aliases.")
    p.add_argument("--dumps", required=True, metavar="DIR_OR_LIST",
                   help="directory searched for *.ipa-clones, one dump, or a file listing dumps")
    p.add_argument("--objects", metavar="DIR", type=Path,
                   help="directory of the objects (default: X.o or X.o.syms beside each dump)")
    p.add_argument("funcs", nargs="*", metavar="FUNC", help="function name or file.c:name")
    p.add_argument("--patch", type=Path, help="unified diff: analyse the functions its hunks touch (found from "
                   "the objects' DWARF line tables when built with -g, else by parsing the source)")
    p.add_argument("--source", type=Path, default=Path("."),
                   help="source tree the patch applies to (default: current directory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text tree")
    p.add_argument("--dot", type=Path, metavar="OUT.dot", help="write the impact graph for Graphviz")
    p.add_argument("--svg", type=Path, metavar="OUT.svg", help="render the impact graph with Graphviz")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk index")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``klpforge impact``; returns the exit code."""
    from ..ipa import report
    from ..ipa.closure import impact
    from ..ipa.dumps import find_dumps
    from ..ipa.index import load_index

    if args.patch and args.funcs:
        raise InputError("give either FUNC... or --patch, not both")
    if not args.patch and not args.funcs:
        raise InputError("nothing to analyse: give FUNC... or --patch FILE")
    if args.dot and args.svg:
        raise InputError("give either --dot or --svg, not both")
    check_paths({"--dot": args.dot, "--svg": args.svg},
                {"--dumps": args.dumps, "--objects": args.objects, "--patch": args.patch,
                 "--source": args.source if args.patch else None},
                kinds={"--dumps": "any", "--objects": "dir", "--source": "dir"},
                reads=(".o", ".ipa-clones", ".syms", ".c", ".h", ".ko"))
    dumps = find_dumps(args.dumps)
    notes: list[str] = []
    if not dumps:
        from ..ipa.dwarf import fallback_index
        idx, msg = fallback_index(Path(args.dumps), args.objects)
        notes.append(msg)
    else:
        root = Path(args.dumps) if Path(args.dumps).is_dir() else None
        idx = load_index(dumps, args.objects, root, use_cache=not args.no_cache)
    funcs = list(args.funcs)
    if args.patch:
        from ..ipa.patchmap import functions_of_patch
        dumps_dir = Path(args.dumps) if Path(args.dumps).is_dir() else Path(args.dumps).parent
        funcs, pnotes = functions_of_patch(args.patch, args.source, args.objects or dumps_dir)
        notes += pnotes
        if not funcs:
            raise InputError(f"{args.patch}: no hunk touches a function")
    res = impact(idx, funcs)
    res.notes = notes + res.notes
    if args.json:
        sys.stdout.write(report.to_json(res))
    else:
        sys.stdout.write(report.to_text(res, color=sys.stdout.isatty()))
    if args.dot:
        atomic_write(args.dot, report.to_dot(res))
    if args.svg:
        report.write_svg(res, args.svg)
    return 0
