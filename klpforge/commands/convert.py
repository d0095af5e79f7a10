"""``klpforge convert MOD.ko --symbols vmlinux -o OUT.ko``: klp relocations for a hand-written live patch.

>>> # klpforge convert livepatch-sample.ko --symbols $KERNEL_BUILD/vmlinux -o livepatch-sample.klp.ko
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..util.outputs import check_paths

__all__ = ["register", "run_convert"]


def run_convert(args: argparse.Namespace) -> int:
    """Convert; print one line per klp symbol written. Exit 0, 1 (bad input) or 2 (ambiguous name)."""
    from ..source.convert import convert_module, parse_sympos

    ins: dict[str, str | None] = {"MOD.ko": args.module, "--symbols": args.symbols}
    ins.update({f"--module-symbols #{k}": d for k, d in enumerate(args.module_symbols, 1)})
    ins.update({f"--symvers #{k}": d for k, d in enumerate(args.symvers, 1)})
    kinds = {f"--module-symbols #{k}": "dir" for k in range(1, len(args.module_symbols) + 1)}
    check_paths({"-o": args.output}, ins, kinds)
    given = {}
    for s in args.sympos:
        obj, name, pos = parse_sympos(s)
        given[(obj, name)] = pos
    res = convert_module(Path(args.module), Path(args.output), Path(args.symbols),
                         [Path(d) for d in args.module_symbols], [Path(s) for s in args.symvers], given)
    for obj, name, pos in res.converted:
        sys.stdout.write(f".klp.sym.{obj}.{name},{pos}\n")
    print(f"klpforge convert: {args.output}: {len(res.converted)} klp symbol(s), "
          f"{len(res.kept)} exported reference(s) left to the module loader", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` to the CLI."""
    p = subparsers.add_parser(
        "convert", help="turn a livepatch module's references to non-exported kernel symbols into klp relocations",
        description="Undefined symbols of MOD.ko that the target does not export become .klp.rela.OBJ.SECTION "
                    "relocations against .klp.sym.OBJ.NAME,POS symbols (kernel livepatch ELF format), resolved "
                    "by the kernel when the patch loads. Build MOD.ko with KBUILD_MODPOST_WARN=1. A name "
                    "defined more than once needs its position: KLP_SYMPOS(OBJ, NAME, POS) from "
                    "klpforge/data/klpforge_sympos.h or --sympos. Exit 2 when a position is missing.")
    p.add_argument("module", metavar="MOD.ko", help="linked livepatch module (MODULE_INFO(livepatch, \"Y\"))")
    p.add_argument("--symbols", required=True, metavar="FILE",
                   help="the running kernel's vmlinux (ELF), `readelf -s --wide` text of it, or /proc/kallsyms")
    p.add_argument("--module-symbols", action="append", default=[], metavar="DIR",
                   help="directory of the kernel's modules (*.ko at any depth): references to their symbols "
                        "become klp relocations for that module; repeatable")
    p.add_argument("--symvers", action="append", default=[], metavar="Module.symvers",
                   help="more exported symbols (besides __ksymtab_NAME in the symbols); repeatable")
    p.add_argument("--sympos", action="append", default=[], metavar="[OBJ:]NAME,POS",
                   help="position of a name defined more than once (kernel sympos, 1-based); repeatable")
    p.add_argument("-o", "--output", required=True, metavar="OUT.ko", help="converted module")
    p.set_defaults(func=run_convert)
