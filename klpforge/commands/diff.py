"""``klpforge diff ORIG.o PATCHED.o -o OUT.o --target vmlinux|MOD --symtab FILE [--symvers F] [--json F]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..util.errors import EXIT_NO_CHANGE, EXIT_OK, EXIT_UNSAFE, InputError, KlpError
from ..util.outputs import atomic_write, check_paths

if TYPE_CHECKING:
    from ..diff import DiffResult

__all__ = ["register", "run_pair"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff", help="turn an original and a patched object into a livepatch object",
        description="Correlate, compare and select; write a livepatch object with .klp.rela/.klp.sym. "
                    "Exit 0 written, 1 error, 2 unsafe change refused, 3 no change (no live patch written on 1-3; "
                    "--json, when given, then holds the result, exit code, error and every reason).")
    p.add_argument("orig", type=Path, help="object built from the original source")
    p.add_argument("patched", type=Path, help="the same object built from the patched source")
    p.add_argument("-o", "--output", type=Path, required=True, help="livepatch object to write")
    p.add_argument("--target", default="vmlinux",
                   help="object being patched: vmlinux or a module name (as the kernel names it: '-' is taken as '_')")
    p.add_argument("--symtab", type=Path, required=True,
                   help="symbol table of the target: vmlinux / the .ko, or `readelf -s --wide` output")
    p.add_argument("--symvers", type=Path, help="Module.symvers (exported symbols stay normal relocations)")
    p.add_argument("--json", type=Path, metavar="REPORT",
                   help="write the JSON report here; written too when the diff is refused (exit 2), finds no change "
                        "(3) or fails (1): result, exit, error, reasons (as build --json)")
    p.add_argument("--entsize", action="append", default=[], metavar="VAR=N",
                   help="special-section entry size, e.g. JUMP_STRUCT_SIZE=16 (default: environment)")
    p.add_argument("--impact", metavar="DUMPS", help="ipa-clones dumps: check changed functions were predicted")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stdout")
    p.set_defaults(func=run)


def _check_own_output(tmp: Path, output: Path) -> None:
    """Read the livepatch back and validate it (:func:`klpforge.elf.validate.validate`) before it replaces
    ``output``: a damaged input that slipped past the input checks ends as an error, not a malformed file."""
    from ..elf import ElfFile
    from ..elf.validate import validate

    try:
        validate(ElfFile.open(tmp))
    except InputError as e:
        detail = str(e).split(": ", 1)[-1]
        raise InputError(f"{output}: the live patch made from these inputs is malformed ({detail}); "
                         "nothing written") from None


def _target_name(target: str) -> str:
    """``--target`` as the kernel names the object: ``vmlinux`` or ``mod->name``, where Kbuild turned every
    ``-`` of the file name into ``_`` (6.1 scripts/Makefile.lib ``modname``); the klp sections are matched
    against that name exactly (6.1 kernel/livepatch/core.c ``klp_apply_section_relocs``: ``strcmp``, then
    ``%55[^.]``), so ``kvm-intel`` would leave every ``.klp.rela.kvm-intel.*`` section unapplied.

    >>> _target_name("kvm-intel")
    'kvm_intel'

    Raises :class:`InputError` for a name the kernel cannot have (a dot, a slash, over 55 characters).
    """
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,55}", target):
        raise InputError(f"--target {target!r}: not a module name (vmlinux or a module's name: letters, digits, "
                         "'_' or '-', at most 55 characters; the kernel parses .klp.rela.<obj>.<section> with "
                         "%55[^.])")
    return target.replace("-", "_")


def run(args: argparse.Namespace) -> int:
    res = run_pair(args)
    if not args.quiet:
        from ..diff.report import print_summary  # rich: only for the summary (process-per-object runs use -q)

        print_summary(res)
    return EXIT_OK


def run_pair(args: argparse.Namespace) -> DiffResult:
    """One ``klpforge diff`` (parsed ``args``) without the summary: check every path, diff, write the
    output and the ``--json`` report; :mod:`.diffbatch` runs it per line. Raises :class:`KlpError`."""
    import os
    import tempfile

    from ..diff import DiffOptions, run_diff

    env = dict(os.environ)
    for kv in args.entsize:
        k, sep, v = kv.partition("=")
        if not sep:
            raise InputError(f"--entsize {kv!r}: expected VAR=N")
        env[k] = v
    args.target = _target_name(args.target)
    # every input and output before any work: nothing is written when one is wrong
    check_paths({"-o": args.output, "--json": args.json},
                {"ORIG": args.orig, "PATCHED": args.patched, "--symtab": args.symtab, "--symvers": args.symvers,
                 "--impact": args.impact}, kinds={"--impact": "any"})
    report: dict[str, object] = {}
    # the livepatch goes to a hidden file beside -o and is renamed over it only when everything else
    # (the --impact check included) has succeeded: a failure leaves no new output and the old one intact
    fd, tmp_name = tempfile.mkstemp(prefix=f".{args.output.name}.", suffix=".tmp", dir=args.output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            res = run_diff(args.orig, args.patched, tmp,
                           DiffOptions(target=args.target, symtab=args.symtab, symvers=args.symvers, env=env))
            report = res.report
        except KlpError as e:
            if args.json:
                # the same fields as build --json on a failure (docs/inputs-outputs.md)
                result = {EXIT_UNSAFE: "refused", EXIT_NO_CHANGE: "no change"}.get(e.exit_code, "error")
                atomic_write(args.json, json.dumps({"result": result, "exit": e.exit_code, "error": str(e),
                                                    "reasons": getattr(e, "reasons", [str(e)])}, indent=2) + "\n")
            raise
        _check_own_output(tmp, args.output)
        if args.impact:
            from ..diff.impact_check import check_impact
            report["impact"] = check_impact(Path(args.impact), res)
        if args.json:
            atomic_write(args.json, json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    return res
