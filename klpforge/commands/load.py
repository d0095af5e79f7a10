"""``klpforge load MOD.ko``: check a live patch against the running kernel, insmod it, wait for the transition.

>>> # klpforge load livepatch-fix.ko --timeout 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_load"]


def run_load(args: argparse.Namespace) -> int:
    """Check, load, report each step (the loader's lines); the exit code of the loader."""
    from ..host.actions import load

    return load(Path(args.module), args.timeout, args.defer)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``load``."""
    p = subparsers.add_parser(
        "load", help="check a live patch against the running kernel and load it",
        description="Check MODULE against the running kernel (vermagic release, livepatch=Y, target modules "
                    "loaded, signature if the kernel enforces signatures), insmod it, wait until the "
                    "transition is over and report each step. A transition still running after --timeout "
                    "names the tasks that block it (with their kernel stacks) and is reversed. Needs root.",
        epilog="exit codes: 0 loaded (or already loaded), 1 error (insmod failed, transition timed out and "
               "was reversed), 2 refused before insmod (another kernel release, a target module not loaded, "
               "an unsigned module where signatures are enforced)")
    p.add_argument("module", metavar="MODULE.ko", help="the live patch module")
    p.add_argument("--timeout", type=int, default=60, metavar="S",
                   help="seconds the transition may take (default 60; Linux 5.1+ sends blocking tasks a fake "
                        "signal every 15 s by itself, older kernels get it from the <patch>/signal file)")
    p.add_argument("--defer", action="store_true",
                   help="load even if a target module is not loaded (the kernel patches it when it loads)")
    p.set_defaults(func=run_load)
