"""``klpforge kernel prepare``: a small cached test kernel for ``build`` and ``verify``.

>>> # klpforge kernel prepare -j2 ; eval "$(klpforge kernel prepare)"
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run_prepare"]


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare (or find cached) the kernel and print ``KERNEL_SRC=``/``KERNEL_BUILD=``/``BZIMAGE=`` lines."""
    from ..kbuild.clang import variant_for
    from ..kbuild.prepare import KernelLayout, prepare_kernel
    from ..util.errors import InputError
    from ..util.termout import console, status

    variant = variant_for(args.toolchain, args.lto, args.cfi)
    version = args.version or ("7.3" if variant else "6.1")
    if args.variant:
        if variant:
            raise InputError("--variant and --toolchain clang cannot be combined")
        variant = args.variant
    if variant.startswith("clang") and version != "7.3":
        raise InputError(f"--toolchain clang: the Clang test kernel is 7.3 (linux-source-7.3), not {version}")
    if version == "7.3" and not variant.startswith("clang"):
        raise InputError("kernel 7.3 is prepared only with --toolchain clang (Clang 19, see docs/clang.md)")
    args.version, args.variant = version, variant
    layout = KernelLayout.default(args.version, args.cache, args.variant or "")
    err = console(stderr=True)
    with status(err, "kernel prepare", "preparing kernel", out=sys.stderr):  # stdout: the paths, for eval
        def say(msg: str) -> None:
            err.log(msg) if err.is_terminal else print(f"klpforge kernel prepare: {msg}", file=sys.stderr,
                                                       flush=True)

        res = prepare_kernel(layout, jobs=args.jobs, force=args.force, progress=say)
    name = args.version + (f"-{args.variant}" if args.variant else "")
    err.print(f"kernel {name}: {'cached' if res.cached else 'built'} in {res.seconds:.1f} s")
    sys.stdout.write(res.shell())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kernel`` (with sub-command ``prepare``) to the CLI."""
    p = subparsers.add_parser("kernel", help="prepare a small cached test kernel (Debian linux-source)")
    sub = p.add_subparsers(dest="kernel_command", metavar="SUBCOMMAND")
    pp = sub.add_parser(
        "prepare", help="unpack, configure (tinyconfig + fragment) and build once; print paths",
        description="Prints KERNEL_SRC=, KERNEL_BUILD=, BZIMAGE= and INITRAMFS= lines for eval.")
    pp.add_argument("--version", default=None,
                    help="kernel version (Debian linux-source-VERSION; default 6.1, 7.3 with --toolchain clang)")
    pp.add_argument("--cache", metavar="DIR",
                    help="cache root (default $KLPFORGE_CACHE or ~/.cache/klpforge); "
                         "the kernel goes in DIR/kernel-VERSION")
    pp.add_argument("--variant", choices=["ibt"], default=None,
                    help="a variant with its own build directory: ibt = CONFIG_X86_KERNEL_IBT=y "
                         "(objtool on the linked module; DIR/kernel-VERSION-ibt)")
    pp.add_argument("--toolchain", choices=["gcc", "clang"], default="gcc",
                    help="clang: the 7.3 kernel built with Clang 19/LLD 19 (`make LLVM=-19`) in a Debian 13 "
                         "build root (DIR/kernel-7.3-clang[-thin][-cfi])")
    pp.add_argument("--lto", choices=["thin"], default=None,
                    help="thin: ThinLTO, distributed mode (CONFIG_LTO_CLANG_THIN_DIST); needs --toolchain clang")
    pp.add_argument("--cfi", action="store_true", help="kCFI (CONFIG_CFI); needs --toolchain clang")
    pp.add_argument("-j", "--jobs", type=int, default=None, help="parallel make jobs (default: CPU count)")
    pp.add_argument("--force", action="store_true", help="rebuild even if the stamp says it is up to date")
    pp.set_defaults(func=run_prepare)
    p.set_defaults(func=lambda _a: (p.print_help(), 1)[1])
