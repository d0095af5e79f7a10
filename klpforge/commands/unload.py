"""``klpforge unload NAME``: disable a live patch, wait for the transition, rmmod it.

>>> # klpforge unload livepatch_fix
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run_unload"]


def run_unload(args: argparse.Namespace) -> int:
    """Disable, wait, unload; the loader's exit code."""
    from ..host.actions import unload

    return unload(args.name, args.timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``unload``."""
    p = subparsers.add_parser(
        "unload", help="disable a loaded live patch, wait for the transition, remove the module",
        description="Write 0 to /sys/kernel/livepatch/NAME/enabled, wait until the patch is gone (the "
                    "kernel frees it when the transition is over), then rmmod. A patch already replaced by a "
                    "cumulative one is only removed. Needs root.",
        epilog="exit codes: 0 unloaded, 1 error (not loaded, transition timed out and was reversed: the "
               "patch stays enabled, rmmod failed)")
    p.add_argument("name", metavar="NAME", help="module name (livepatch_fix; '-' and '_' are the same) or .ko file")
    p.add_argument("--timeout", type=int, default=60, metavar="S",
                   help="seconds the transition may take (default 60)")
    p.set_defaults(func=run_unload)
