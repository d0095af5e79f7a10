"""``klpforge build -s KERNEL_SRC [-O BUILD] fix.patch [-o FILE.ko]``: a livepatch module from a patch.

>>> # klpforge build -s $KERNEL_SRC -O $KERNEL_BUILD fix.patch -o livepatch-fix.ko
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..kbuild.pipeline import STEPS, SUBSTEPS, BuildOptions, BuildResult, build_livepatch
from ..util.errors import EXIT_NO_CHANGE, EXIT_UNSAFE, InputError, KlpError, UnsafeChange
from ..util.fsutil import atomic_write
from ..util.outputs import check_paths
from ..util.termout import console, steps
from ..xen.cli import add_build_args, run_xen_build, wants_xen_build

__all__ = ["register", "run_build", "print_report"]


def print_report(con: Console, res: BuildResult) -> None:
    """The human report: which functions went in, for which object, and why."""
    # the title on a line of its own: a table title wraps at the width of the table
    con.print(f"{res.output} ({res.module_name})", soft_wrap=True, highlight=False, markup=False)
    table = Table()
    table.add_column("target")
    table.add_column("function")
    table.add_column("sympos", justify="right")
    table.add_column("from")
    table.add_column("why")
    for o in res.outcomes:
        # ThinLTO: an object rebuilt only because it imports from a changed file (cross-file inlining)
        lto = (o.report.get("lto") or {}).get("why_rebuilt", "")
        src = o.obj + ("" if not lto or lto.startswith("changed by the patch") else f" ({lto.split(';')[0]})")
        for f in o.funcs:
            table.add_row(o.target, f.old_name, str(f.sympos), src, f.reason or "changed")
        for kind, sym in o.callback_sources.items():
            table.add_row(o.target, sym, "-", o.obj, f"{kind} callback")
        for name, why in o.carried.items():
            table.add_row(o.target, name, "-", o.obj, f"carried: {why}")
    con.print(table)
    if res.unchanged:
        con.print(f"unchanged objects: {', '.join(res.unchanged)}")
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
    con.print(f"[green]built[/] {res.output} in {sum(res.timings.values()):.1f} s ({steps})")
    if res.tmpdir:
        con.print(f"temporary files kept in {res.tmpdir}")


def run_build(args: argparse.Namespace) -> int:
    """Build the module (or a Xen payload, or a live patch for a distribution kernel); progress and report on
    stderr."""
    if args.from_source:  # issue 19: klpforge/source/frombuild.py
        from .extract import run_from_source

        return run_from_source(args)
    patches = list(args.patch)
    if not patches:
        raise InputError("give fix.patch (or --from-source DIR)")
    xen = wants_xen_build(args)
    distro = not xen and bool(args.distro or args.config or args.modules or args.headers)
    if len(patches) > 1 and not distro:
        raise InputError("several patch files make one cumulative patch only with --distro or the plain form "
                         "(-c CONFIG / --modules)")
    if args.output and Path(args.output).is_dir():
        raise InputError(f"-o {args.output}: is a directory; klpforge's -o names the module file (kpatch-build's "
                         f"-o is a directory): -o {Path(args.output) / f'livepatch-{Path(patches[0]).stem}.ko'}")
    # every output and input before any work (issue 8): the default output is checked too
    stem = Path(patches[0]).name.removesuffix(".patch").removesuffix(".diff")
    out = args.output.replace("{release}", "x") if args.output else None
    check_paths({"-o": out or (None if xen else f"livepatch-{stem}.ko"),
                 "--json": args.json.replace("{release}", "x") if args.json else None},
                {**{("patch" if k == 0 else f"patch #{k + 1}"): p for k, p in enumerate(patches)},
                 "-s": args.src, "-O": args.build_dir, "-c": args.config, "--symbols": args.symbols,
                 "--symvers": args.symvers, "--modules": args.modules, "--headers": args.headers},
                kinds={"-s": "dir", "-O": "dir", "--modules": "dir", "--headers": "dir"})
    from ..util.unidiff import read_patch

    for patch in patches:  # before any work: not a diff, or a path leaving the tree (absolute, '..')
        read_patch(Path(patch))
    try:
        if xen:
            args.patch = patches[0]
            return run_xen_build(args)
        con = console(stderr=True)
        if distro:
            from .build_distro import run_distro_build

            return run_distro_build(args, con)
        return _run_tree_build(args, con)
    except KlpError as e:
        if isinstance(e, UnsafeChange) and len(e.reasons) > 1:
            # the report (standard output): every reason on its own line; stderr gets one line
            print(f"refused: {len(e.reasons)} unsafe changes", flush=True)
            for r in e.reasons:
                print(f"  - {r}", flush=True)
        if args.json:
            _error_json(args.json.replace("{release}", (args.distro or "x").split(":")[-1]), e)
        raise


#: What ``--json`` says when a build ends without a live patch, by exit code.
RESULTS = {EXIT_UNSAFE: "refused", EXIT_NO_CHANGE: "no change"}


def _error_json(path: str, e: KlpError) -> None:
    """``--json`` of a build that ended without a live patch: the result (refused, no change, error), the exit
    code, the one-line message, every reason, and the kept build log and temporary directory."""
    atomic_write(path, json.dumps({
        "result": RESULTS.get(e.exit_code, "error"), "exit": e.exit_code, "error": str(e),
        "reasons": list(getattr(e, "reasons", None) or [str(e)]),
        "log": str(e.log) if e.log else None, "kept": str(e.kept) if e.kept else None}, indent=1) + "\n")


def _run_tree_build(args: argparse.Namespace, con: Console) -> int:
    """``build -s SRC [-O BUILD]``: a live patch from a built kernel tree."""
    if not args.src:
        raise InputError("-s KERNEL_SRC is required (or --distro NAME:RELEASE, e.g. debian:6.1.0-56-amd64)")
    opts = BuildOptions(src=Path(args.src), patch=Path(args.patch[0]),
                        build=Path(args.build_dir) if args.build_dir else None,
                        output=Path(args.output) if args.output else None, jobs=args.jobs,
                        replace=not args.no_replace, keep_tmp=args.keep_tmp,
                        skip_compiler_check=args.skip_compiler_check,
                        report_json=Path(args.json) if args.json else None)
    with steps(con, "build", len(STEPS)) as show:

        def step(name: str, msg: str) -> None:
            if msg.startswith("kept"):
                con.print(msg, highlight=False)
                return
            name = SUBSTEPS.get(name, name)
            show(STEPS.index(name) if name in STEPS else len(STEPS), msg)

        res = build_livepatch(opts, step)
    print_report(con, res)
    return 0


#: kpatch-build options klpforge does not take, with what to use instead (kpatch-build's usage text, 0.9).
KPATCH_FLAGS: dict[tuple[str, ...], tuple[int, str]] = {
    ("-n", "--name"): (1, "klpforge names the module after its output file: -o livepatch-NAME.ko"),
    ("-v",): (1, "klpforge reads vmlinux from the built tree (-O BUILD); with --distro or the plain form "
                 "give --symbols FILE (also spelled --vmlinux)"),
    ("-d", "--debug"): (0, "use --keep-tmp (keeps the temporary files; the build log is kept on failure anyway) "
                           "and KLPFORGE_DEBUG=1 (tracebacks)"),
    ("-R", "--non-replace"): (0, "use --no-replace"),
    ("--skip-cleanup",): (0, "use --keep-tmp"),
    ("--skip-gcc-check",): (0, "use --skip-compiler-check"),
    ("-t", "--target"): (1, "klpforge compiles only the objects the patch changes: there is no make target"),
    ("-r", "--sourcerpm"): (1, "use --distro NAME:RELEASE (e.g. debian:6.1.0-56-amd64): the distribution's own "
                               "packages are fetched"),
    ("-a", "--archversion"): (1, "use --distro NAME:RELEASE, or --release RELEASE with the plain form"),
    ("-e", "--oot-module", "--oot-module-src"): (1, "out-of-tree modules are not supported yet: patch a module "
                                                    "of the kernel tree"),
    ("--cross-compile",): (1, "klpforge builds for the architecture of the tree's own compiler"),
}


class _KpatchFlag(argparse.Action):
    """A kpatch-build option: one line naming the klpforge equivalent instead of argparse's "unrecognized
    arguments" (which names whatever followed the flag, often the patch)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        hint = next(h for flags, (_n, h) in KPATCH_FLAGS.items() if option_string in flags)
        parser.error(f"{option_string} is a kpatch-build option: {hint}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build`` to the CLI."""
    p = subparsers.add_parser(
        "build", help="build a livepatch module from a source patch on an already built kernel tree",
        description="Recompiles only the objects the patch changes (original and patched), diffs them, "
                    "generates and links the livepatch module. The source and build trees are only read: "
                    "the patch is applied to private copies and every output goes to a temporary directory. "
                    "With --distro debian:RELEASE: for the kernel Debian ships (docs/distro.md).")
    p.add_argument("patch", metavar="fix.patch", nargs="*",
                   help="unified diff, -p1 (as git writes); with --distro several make one cumulative patch")
    p.add_argument("-s", "--src", metavar="KERNEL_SRC", help="kernel (or Xen, with --xen) source tree")
    p.add_argument("--emit-jobs", metavar="FILE",
                   help="with several --distro releases (comma-separated): write the job list (JSON; - for "
                        "stdout) for a CI matrix or Kubernetes Indexed Jobs instead of building (docs/distro.md)")
    p.add_argument("--symbols", "--vmlinux", dest="symbols", metavar="FILE",
                   help="with --distro: vmlinux symbols (a -dbg vmlinux, `readelf -sW` text or a kallsyms capture) "
                        "instead of booting the image once to read /proc/kallsyms")
    p.add_argument("--symvers", metavar="FILE", help="with --distro: Module.symvers instead of the headers package's")
    p.add_argument("--sign-key", metavar="KEY.pem",
                   help="with --distro: sign the live patch with this private key (the kernel's own sign-file); "
                        "needs --sign-cert")
    p.add_argument("--sign-cert", metavar="CERT", help="with --distro: the X.509 certificate of --sign-key (PEM or "
                   "DER), the one the kernel trusts (builtin, or enrolled with mokutil: docs/distro.md)")
    p.add_argument("-c", "--config", metavar="CONFIG",
                   help="plain form (no backend): the kernel's config; -s SRC is prepared with it in the cache, "
                        "never fully built")
    p.add_argument("--modules", metavar="DIR", help="plain form: the shipped modules (lib/modules/RELEASE)")
    p.add_argument("--headers", metavar="DIR",
                   help="plain form: build directory to link the module in (default: the prepared tree)")
    p.add_argument("--release", metavar="RELEASE", help="plain form: kernel release (uname -r)")
    p.add_argument("-O", "--build-dir", metavar="BUILD_DIR", help="build directory (O=; default: KERNEL_SRC)")
    p.add_argument("-o", "--output", metavar="FILE.ko", help="output (default livepatch-<patch>.ko)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--no-replace", action="store_true", help="do not atomically replace earlier patches")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temporary directory (named in the report, or on the error line)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here; written too when the build is "
                   "refused (exit 2), finds no change (3) or fails (1): result, exit, error, reasons, log")
    p.add_argument("--skip-compiler-check", action="store_true",
                   help="do not compare gcc on PATH with vmlinux's .comment (dangerous)")
    p.add_argument("--from-source", metavar="DIR", help="build the sources `klpforge extract` wrote (and you "
                   "reviewed) instead of a patch; cross-checked against the binary diff (docs/source.md)")
    p.add_argument("--force-source", action="store_true",
                   help="with --from-source: ship the source even if the cross-check finds a difference")
    add_build_args(p)
    for flags, (nargs, _hint) in KPATCH_FLAGS.items():
        p.add_argument(*flags, nargs=nargs or 0, action=_KpatchFlag, help=argparse.SUPPRESS)
    p.set_defaults(func=run_build)
