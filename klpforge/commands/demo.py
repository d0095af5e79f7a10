"""``klpforge demo``: compile the bundled example twice with the host gcc and show the live patch.

The example (``klpforge/data/demo``) has a static helper inlined into two callers and a switch that
GCC turns into a ``CSWTCH`` table; the fix changes both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..util.errors import EXIT_OK, InputError
from ..util.outputs import check_output

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
    # from the source's directory, by relative names: the paths GCC records (ipa-clones dumps) stay valid
    # once the demo's directory is renamed into --outdir
    r = subprocess.run([gcc, *CFLAGS, *(extra or []), "-c", src.name, "-o", os.path.relpath(out, src.parent)],
                       capture_output=True, text=True, cwd=src.parent, check=False)
    if r.returncode != 0:
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
        raise InputError(f"gcc failed on {src.name}: {first}")


def run(args: argparse.Namespace) -> int:
    from importlib import resources

    from ..diff import DiffOptions, run_diff
    from ..diff.report import print_summary
    from ..elf import ElfFile
    from ..util.termout import console, rule

    con = console(highlight=False)
    final = _demo_outdir(args.outdir) if args.outdir else None
    # Everything is written into a fresh directory (next to --outdir, so the rename stays on one file
    # system) and moved into place only when the demo has succeeded: never a half-written folder.
    tmp = tempfile.TemporaryDirectory(prefix=f".{final.name}." if final else "klpforge-demo-",
                                      dir=final.parent if final else None, ignore_cleanup_errors=True)
    out = Path(tmp.name).resolve()  # absolute: gcc runs with another working directory
    try:
        src = resources.files("klpforge") / "data" / "demo"
        for name in ("orig.c", "patched.c"):
            (out / name).write_text((src / name).read_text())
        diff = subprocess.run(["diff", "-u", "orig.c", "patched.c"], cwd=out, capture_output=True, text=True,
                              check=False).stdout
        rule(con, "the fix")
        con.print(diff.rstrip(), markup=False)
        for name in ("orig", "patched"):
            (out / name).mkdir(exist_ok=True)
            compile_object(out / f"{name}.c", out / name / "demo.o")
        rule(con, "klpforge diff orig/demo.o patched/demo.o")
        res = run_diff(out / "orig" / "demo.o", out / "patched" / "demo.o", out / "livepatch-demo.o",
                       DiffOptions(target="vmlinux", symtab=out / "orig" / "demo.o", env={}))
        print_summary(res, con)
        dumps = sorted(out.glob("patched/*.ipa-clones"))
        if dumps:
            inlined = [ln.split(";") for ln in dumps[0].read_text().splitlines() if ln.endswith(";inlining to")]
            for f in inlined:
                con.print(f"gcc -fdump-ipa-clones: {f[1]} ({Path(f[3]).name}:{f[4]}) was inlined into {f[6]}")
        rule(con, "the livepatch object")
        elf = ElfFile.open(out / "livepatch-demo.o")
        for i, n in enumerate(elf.section_names):
            if n.startswith(".klp.rela."):
                con.print(f"  section {n}: {int(elf.shdrs['size'][i]) // 24} klp relocation(s)")
        for n in elf.sym_names:
            if n.startswith((".klp.sym.", "klpf_")):
                con.print(f"  symbol  {n}")
        # klpforge impact: what -fdump-ipa-clones predicted for the changed helper, next to what diff found
        from ..diff.impact_check import check_impact, summary_lines
        rule(con, "klpforge diff --impact orig/ (ipa-clones prediction vs what diff found)")
        for line in summary_lines(check_impact(out / "orig", res, use_cache=False)):
            con.print(line, markup=False)
        if final is not None:
            _move_into_place(out, final)
        con.print(f"written: {final / 'livepatch-demo.o'}" if final else
                  "(run with --outdir DIR to keep the files)")
    finally:
        tmp.cleanup()
    return EXIT_OK


#: What a demo output directory holds; another demo run may replace a directory with only these entries.
DEMO_ENTRIES = frozenset({"orig.c", "patched.c", "orig", "patched", "livepatch-demo.o"})


def _demo_outdir(arg: Path) -> Path:
    """``--outdir`` as an absolute path, checked before any work: its parent must exist and be writable; it
    may exist only as an empty directory or an earlier demo's output (:data:`DEMO_ENTRIES`), which is
    replaced, never a directory holding anything else."""
    out = Path(os.path.abspath(arg))
    if out.exists() and not out.is_dir():
        raise InputError(f"--outdir {arg}: exists and is not a directory")
    if out.is_dir():
        extra = sorted(e.name for e in out.iterdir() if e.name not in DEMO_ENTRIES)
        if extra:
            more = ", ..." if len(extra) > 3 else ""
            raise InputError(f"--outdir {arg}: directory holds files the demo did not write "
                             f"({', '.join(extra[:3])}{more}): name a new or empty directory")
    if not out.parent.is_dir():
        why = "is not a directory" if out.parent.exists() else "does not exist"
        raise InputError(f"--outdir {arg}: cannot create: {out.parent} {why}")
    check_output("--outdir", out.parent / "livepatch-demo.o")
    return out


def _move_into_place(built: Path, final: Path) -> None:
    """Rename the finished directory ``built`` to ``final``; an empty or earlier-demo ``final`` is moved
    aside first and removed after (a crash in between leaves the old one, named ``.NAME.old.*``)."""
    built.chmod(0o755)  # TemporaryDirectory makes it 0700
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
