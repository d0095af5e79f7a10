"""``klpforge demo``: compile the bundled example twice with the host gcc and show the live patch.

The example (``klpforge/data/demo``) has a static helper inlined into two callers and a switch that
GCC turns into a ``CSWTCH`` table; the fix changes both.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import EXIT_OK, InputError
from ..outputs import check_output

__all__ = ["register", "CFLAGS", "compile_object"]

#: Kernel-like flags: -O2, a section per function and object, and an ftrace entry in every function.
CFLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-pg", "-mfentry", "-mrecord-mcount", "-fno-PIE",
          "-fno-asynchronous-unwind-tables", "-fdump-ipa-clones"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="build the bundled example twice and show the live patch klpforge makes")
    p.add_argument("--outdir", type=Path, help="keep the objects, livepatch and report here")
    p.set_defaults(func=run)


def compile_object(src: Path, out: Path, extra: list[str] | None = None) -> None:
    """Compile ``src`` to ``out`` with :data:`CFLAGS` (InputError with gcc's first error line)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise InputError("gcc not found on PATH: the demo compiles its example with the host gcc")
    r = subprocess.run([gcc, *CFLAGS, *(extra or []), "-c", str(src), "-o", str(out)], capture_output=True,
                       text=True, cwd=out.parent, check=False)
    if r.returncode != 0:
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
        raise InputError(f"gcc failed on {src.name}: {first}")


def run(args: argparse.Namespace) -> int:
    from importlib import resources

    from rich.console import Console

    from ..diff import DiffOptions, run_diff
    from ..elf import ElfFile
    from ..report import print_summary

    con = Console(highlight=False)
    tmp = None
    if args.outdir:
        out = args.outdir
        if out.exists() and not out.is_dir():
            raise InputError(f"--outdir {out}: exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--outdir {out}: cannot create: {e.strerror}") from None
        check_output("--outdir", out / "livepatch-demo.o")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="klpforge-demo-")
        out = Path(tmp.name)
    try:
        src = resources.files("klpforge") / "data" / "demo"
        for name in ("orig.c", "patched.c"):
            (out / name).write_text((src / name).read_text())
        diff = subprocess.run(["diff", "-u", "orig.c", "patched.c"], cwd=out, capture_output=True, text=True,
                              check=False).stdout
        con.rule("the fix")
        con.print(diff.rstrip(), markup=False)
        for name in ("orig", "patched"):
            (out / name).mkdir(exist_ok=True)
            compile_object(out / f"{name}.c", out / name / "demo.o")
        con.rule("klpforge diff orig/demo.o patched/demo.o")
        res = run_diff(out / "orig" / "demo.o", out / "patched" / "demo.o", out / "livepatch-demo.o",
                       DiffOptions(target="vmlinux", symtab=out / "orig" / "demo.o", env={}))
        print_summary(res, con)
        dumps = sorted(out.glob("patched/*.ipa-clones"))
        if dumps:
            inlined = [ln.split(";") for ln in dumps[0].read_text().splitlines() if ln.endswith(";inlining to")]
            for f in inlined:
                con.print(f"gcc -fdump-ipa-clones: {f[1]} ({Path(f[3]).name}:{f[4]}) was inlined into {f[6]}")
        con.rule("the livepatch object")
        elf = ElfFile.open(out / "livepatch-demo.o")
        for i, n in enumerate(elf.section_names):
            if n.startswith(".klp.rela."):
                con.print(f"  section {n}: {int(elf.shdrs['size'][i]) // 24} klp relocation(s)")
        for n in elf.sym_names:
            if n.startswith((".klp.sym.", "klpf_")):
                con.print(f"  symbol  {n}")
        # klpforge impact: what -fdump-ipa-clones predicted for the changed helper, next to what diff found
        from ..impact_check import check_impact, summary_lines
        con.rule("klpforge diff --impact orig/ (ipa-clones prediction vs what diff found)")
        for line in summary_lines(check_impact(out / "orig", res, use_cache=False)):
            con.print(line, markup=False)
        con.print(f"written: {out / 'livepatch-demo.o'}" if args.outdir else
                  "(run with --outdir DIR to keep the files)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return EXIT_OK
