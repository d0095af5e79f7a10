"""``klpforge install MOD.ko``: keep a live patch for its kernel release and load it at every boot.

>>> # klpforge install livepatch-fix.ko [--kernel-release R] [--root DIR] [--before nginx.service]
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_install"]


def run_install(args: argparse.Namespace) -> int:
    """Check, copy into the store, install the unit; one line per result on stdout."""
    from ..host.actions import install
    from ..host.store import host_root
    from ..host.unit import check_unit_names

    root = host_root(args.root)
    dest, unit = install(Path(args.module), root, args.kernel_release, not args.no_unit,
                         check_unit_names(args.before))
    print(f"installed {dest}")
    if unit is not None:
        print(f"boot unit {unit} (enabled: loads the patches of the running release at boot)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``install``."""
    p = subparsers.add_parser(
        "install", help="install a live patch for its kernel release and load it at boot",
        description="Check MODULE against the running kernel release (or --kernel-release), copy it to "
                    "ROOT/var/lib/klpforge/RELEASE/ (with its metadata, appended to the load order) and "
                    "install the boot unit ROOT/etc/systemd/system/klpforge.service (enabled) with its loader "
                    "ROOT/usr/local/lib/klpforge/klpforge-load. It does not load the patch now: see load.",
        epilog="exit codes: 0 installed, 1 error, 2 refused (not a live patch, built for another release)")
    p.add_argument("module", metavar="MODULE.ko", help="the live patch module")
    p.add_argument("--kernel-release", metavar="R", help="install for release R instead of the running one")
    p.add_argument("--root", metavar="DIR",
                   help="install under DIR instead of / (also $KLPFORGE_ROOT): images, tests")
    p.add_argument("--before", action="append", default=[], metavar="UNIT",
                   help="the boot unit runs before UNIT (repeatable; it always runs before sysinit.target)")
    p.add_argument("--no-unit", action="store_true", help="do not install the boot unit and loader")
    p.set_defaults(func=run_install)
