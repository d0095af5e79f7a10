"""``klpforge list``: installed and loaded live patches, their state and which replace which.

>>> # klpforge list [--all] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register", "run_list"]


def run_list(args: argparse.Namespace) -> int:
    """Print the table (or JSON)."""
    from ..host.actions import PatchRow, patch_rows
    from ..host.store import host_root

    rows = patch_rows(host_root(args.root), args.all)
    if args.json:
        json.dump([r.to_json() for r in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no live patches installed or loaded")
        return 0
    head = ("NAME", "RELEASE", "INSTALLED", "STATE", "OBJECTS", "CUMULATIVE")

    def cumulative(r: PatchRow) -> str:
        if r.replace is None:
            return "?"
        if not r.replace:
            return "no"
        return f"yes (replaced {', '.join(r.replaces)})" if r.replaces else "yes"

    table = [head] + [(r.name, r.release, r.installed or "-", r.state, r.objects or "-", cumulative(r))
                      for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    for t in table:  # plain columns: readable in a pipe, a log and a terminal alike
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=False)) + "  " + t[-1])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``list``."""
    p = subparsers.add_parser(
        "list", help="installed and loaded live patches, their state, which replace which",
        description="One line per live patch installed for the running release (ROOT/var/lib/klpforge, and "
                    "packages in ROOT/usr/lib/klpforge) or loaded (/sys/kernel/livepatch, modules tainted K): "
                    "STATE is enabled, disabled, transition, replaced (a cumulative patch took over; the "
                    "module is still loaded) or not loaded; OBJECTS lists each patched object with its "
                    "per-object 'patched' state (Linux 6.1+: patched, or waiting for the module to load); "
                    "CUMULATIVE says whether a patch replaces every earlier one (klp_patch.replace) and which it "
                    "replaced (installed before it in the load order, or loaded and dropped by the kernel).",
        epilog="exit codes: 0 ok, 1 error")
    p.add_argument("--all", action="store_true", help="also patches installed for other kernel releases")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.add_argument("--root", metavar="DIR", help="read DIR/var/lib/klpforge, DIR/sys and DIR/proc instead of / "
                                                  "(also $KLPFORGE_ROOT)")
    p.set_defaults(func=run_list)
