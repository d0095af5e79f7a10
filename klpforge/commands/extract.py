"""``klpforge extract -s SRC [-O BUILD] PATCH -o DIR``: the live patch as reviewable C sources.

>>> # klpforge extract -s $KERNEL_SRC -O $KERNEL_BUILD fix.patch -o livepatch-fix/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..util.outputs import check_paths

__all__ = ["register", "run_extract"]


def run_extract(args: argparse.Namespace) -> int:
    """Extract; list the files written with their line counts on stdout."""
    from ..source.extract import extract

    check_paths({}, {"patch": args.patch, "-s": args.src, "-O": args.build_dir}, kinds={"-s": "dir", "-O": "dir"})
    out = Path(args.output)
    if not out.parent.resolve().is_dir():
        from ..util.errors import InputError

        raise InputError(f"-o {out}: directory {out.parent} does not exist")
    res = extract(Path(args.src), Path(args.build_dir) if args.build_dir else None, Path(args.patch), out,
                  args.jobs)
    for f in res.files:
        n = res.lines.get(f.name)
        sys.stdout.write(f"{f}{f'  ({n} lines)' if n is not None else ''}\n")
    for obj, funcs in res.functions.items():
        print(f"klpforge extract: {obj}: {', '.join(funcs)}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract`` to the CLI."""
    p = subparsers.add_parser(
        "extract", help="write the live patch as C sources to review (functions proved by the binary diff)",
        description="Runs the binary diff of `klpforge build` to learn which functions must be replaced, then "
                    "writes per changed object one C file with those functions (source text) and their closure "
                    "(macros, file-local types, inlined static helpers; other statics declared, file-scope "
                    "variables extern), klp_patch.c, a Kbuild file and klpforge-extract.json. Build it with "
                    "`klpforge build --from-source DIR`. Exit 2 when the closure cannot be extracted.")
    p.add_argument("patch", metavar="PATCH", help="unified diff, -p1")
    p.add_argument("-s", "--src", required=True, metavar="KERNEL_SRC", help="kernel source tree")
    p.add_argument("-O", "--build-dir", metavar="BUILD_DIR", help="build directory (O=; default: KERNEL_SRC)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.set_defaults(func=run_extract)


def run_from_source(args: argparse.Namespace) -> int:
    """``klpforge build --from-source DIR -s SRC [-O BUILD] [-o OUT.ko] [--force-source]``: compile, convert,
    cross-check; the per-function verdicts on stderr."""
    from ..source.frombuild import build_from_source
    from ..util.errors import InputError

    if not args.src:
        raise InputError("--from-source needs -s KERNEL_SRC (and -O BUILD_DIR for an O= build)")
    if args.patch:
        raise InputError("--from-source DIR takes no patch file (the sources are the patch)")
    d = Path(args.from_source)
    out = Path(args.output or f"{d.resolve().name}.ko")
    check_paths({"-o": out}, {"--from-source": d, "-s": args.src, "-O": args.build_dir},
                kinds={"--from-source": "dir", "-s": "dir", "-O": "dir"})
    res = build_from_source(d, Path(args.src), Path(args.build_dir) if args.build_dir else None, out,
                            args.force_source, args.jobs)
    for name, verdict in res.checks.items():
        print(f"klpforge build: cross-check {name}: {verdict}", file=sys.stderr)
    print(f"klpforge build: {out}: from source, {len(res.converted.converted)} klp symbol(s)"
          + (" (cross-check differences forced)" if res.forced else ""), file=sys.stderr)
    return 0
