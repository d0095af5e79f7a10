"""``klpforge package MOD.ko --format deb``: a Debian package that installs a live patch and loads it at boot.

>>> # klpforge package livepatch-fix.ko --format deb --version 1.2 --patch fix.patch --cve CVE-2024-1234
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_package"]


def run_package(args: argparse.Namespace) -> int:
    """Check the inputs and the output path, build the package, print its path."""
    from ..host.deb import DebSpec, build_deb, deb_arch, package_name
    from ..host.inspect import inspect_module
    from ..host.unit import check_unit_names
    from ..util.errors import InputError, UnsafeChange
    from ..util.outputs import check_paths

    ko = Path(args.module)
    inputs = {"MODULE": ko, **{f"--patch {p}": Path(p) for p in args.patch}}
    if args.report:
        inputs["--report"] = Path(args.report)
    check_paths(outputs={}, inputs=inputs)
    pm = inspect_module(ko)
    if not pm.livepatch:
        raise UnsafeChange(f"refused: {ko}: not a livepatch module (no livepatch=Y in .modinfo)")
    if not pm.release:
        raise InputError(f"{ko}: no vermagic in .modinfo: cannot tell the kernel release")
    spec = DebSpec(version=args.version, package=args.package_name, patches=[Path(p) for p in args.patch],
                   cves=args.cve, report=Path(args.report) if args.report else None,
                   maintainer=args.maintainer, before=check_unit_names(args.before))
    name = f"{spec.package or package_name(pm)}_{args.version}_{deb_arch(ko)}.deb"
    out = Path(args.output) if args.output else Path(args.outdir or ".") / name
    check_paths(outputs={"-o": out}, inputs=inputs)
    build_deb(pm, spec, out)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``package``."""
    p = subparsers.add_parser(
        "package", help="a distribution package (.deb) that installs a live patch and loads it at boot",
        description="Write PKG_VERSION_ARCH.deb (dpkg-deb) into the current directory (or --outdir, or -o): "
                    "the module under /usr/lib/klpforge/RELEASE/, a systemd unit and loader that load it at "
                    "boot of that release, maintainer scripts that load it on installation and unload it on "
                    "removal, Depends on the exact kernel image (linux-image-RELEASE), and metadata: fixes "
                    "(patch files, upstream commits, CVE ids), replaced functions, klpforge's version, the "
                    "build inputs' hashes the build recorded.",
        epilog="exit codes: 0 written, 1 error, 2 refused (not a live patch)")
    p.add_argument("module", metavar="MODULE.ko", help="the live patch module")
    p.add_argument("--format", choices=["deb"], required=True, help="package format (deb)")
    p.add_argument("--version", default="1", metavar="V", help="package version (default 1)")
    p.add_argument("--package-name", metavar="PKG", help="default klp-NAME-RELEASE")
    p.add_argument("--patch", action="append", default=[], metavar="FILE",
                   help="a patch file the module was built from (repeatable): shipped in the docs, its hash, "
                        "subject, upstream commits and CVE ids go into the metadata")
    p.add_argument("--cve", action="append", default=[], metavar="CVE-YYYY-N", help="a CVE id the patch fixes")
    p.add_argument("--report", metavar="FILE", help="the build's --json report (provenance, if it has one)")
    p.add_argument("--maintainer", metavar="'NAME <MAIL>'", help="default $DEBFULLNAME <$DEBEMAIL>")
    p.add_argument("--before", action="append", default=[], metavar="UNIT",
                   help="the package's boot unit runs before UNIT (repeatable)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="write the package here")
    out.add_argument("--outdir", metavar="DIR", help="write PKG_VERSION_ARCH.deb into DIR (default .)")
    p.set_defaults(func=run_package)
