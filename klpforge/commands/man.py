"""``klpforge man [-o DIR]``: write the man pages, generated from the argument parser (they never drift).

>>> # klpforge man -o /usr/local/share/man/man1 && man klpforge-load
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run_man"]


def run_man(args: argparse.Namespace) -> int:
    """Write every page into ``--outdir`` (or one page, ``--page``, to stdout)."""
    from ..cli import _parser
    from ..host.manpage import man_pages
    from ..util.errors import InputError
    from ..util.fsutil import atomic_write

    pages = man_pages(_parser())
    if args.page:
        key = args.page if args.page.endswith(".1") else (
            "klpforge.1" if args.page == "klpforge" else f"klpforge-{args.page}.1")
        if key not in pages:
            raise InputError(f"no man page {args.page!r} (commands: {', '.join(sorted(pages))})")
        sys.stdout.write(pages[key])
        return 0
    out = Path(args.outdir)
    if not out.is_dir():
        raise InputError(f"{out}: not a directory")
    for name, text in pages.items():
        atomic_write(out / name, text, mode=0o644)
    print(f"{len(pages)} man pages written to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``man``."""
    p = subparsers.add_parser("man", help="write the man pages (generated from the command-line parser)",
                              description="Write klpforge.1 and klpforge-COMMAND.1 for every command into "
                                          "DIR, or print one page.",
                              epilog="exit codes: 0 ok, 1 error")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-o", "--outdir", metavar="DIR", help="write every page into DIR (e.g. a man1 directory)")
    g.add_argument("--page", metavar="COMMAND", help="print the page of COMMAND (or klpforge) to stdout")
    p.set_defaults(func=run_man)
