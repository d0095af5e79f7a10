"""Compile single objects of a prepared distribution tree, original and patched, never a full build.

*original*: a Kbuild single-target build (``make O=build fs/nfsd/nfs4state.o``, Linux 6.1 Kbuild), so the
object gets exactly the flags Kbuild gives it (``-DMODULE``, ``KBUILD_MODNAME``, objtool), plus
:data:`~klpforge.distro.debian.KCFLAGS`; Kbuild records the command in ``build/<dir>/.<obj>.cmd``.

*patched*: the files the patch touches are copied into a private overlay directory and patched there (the
cached source stays pristine); the recorded command is re-run with the overlay's ``.c``, the overlay's
include directories first, ``-fmacro-prefix-map=<overlay>/=`` (so ``__FILE__`` reads as in the original,
Debian builds with ``-fmacro-prefix-map=$(srctree)/=``) and the output in a temp directory.

>>> overlay_command("gcc -nostdinc -I/s/include -c -o fs/a.o /s/fs/a.c ; objtool fs/a.o",
...                 "fs/a.o", Path("/s"), Path("/ov"), Path("/t/a.o")).split()[4:]
['-fmacro-prefix-map=/ov/=', '-nostdinc', '-I/s/include', '-c', '-o', '/t/a.o', '/ov/fs/a.c', ';', 'objtool', '/t/a.o']
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..kbuild.patchfile import SourcePatch
from ..kbuild.tree import CompileCommand, cmd_file_of, parse_cmd_file
from ..util.errors import InputError
from ..util.fsutil import tree_lock
from ..util.proc import run
from .base import DistroTree, run_logged
from .debian import make_command
from .roots import in_root

__all__ = ["ObjectParent", "recorded_command", "parent_of", "compile_original", "compile_patched",
           "overlay_command", "make_overlay_all", "ipa_dump_of"]


@dataclass(frozen=True)
class ObjectParent:
    """Where an object is linked: ``vmlinux`` or the module named ``KBUILD_MODNAME``."""

    target: str
    is_module: bool


def recorded_command(tree: DistroTree, obj: str) -> CompileCommand:
    """The command Kbuild recorded for ``obj`` in ``build/<dir>/.<name>.cmd`` (after a single-target build)."""
    cmdf = cmd_file_of(tree.build, obj)
    try:
        text = cmdf.read_text()
    except OSError:
        raise InputError(f"{cmdf}: missing; compile {obj} first") from None
    got = parse_cmd_file(text, obj)
    if got is None:
        raise InputError(f"{cmdf}: no cmd_/source_ line for {obj}")
    cmd, src = got
    srcp = Path(src) if Path(src).is_absolute() else tree.build / src
    return CompileCommand(obj, cmd, srcp)


def parent_of(cmd: CompileCommand) -> ObjectParent:
    """vmlinux, or the module: Kbuild passes ``-DMODULE`` and ``-DKBUILD_MODNAME='"name"'`` to module objects."""
    m = re.search(r"-DKBUILD_MODNAME='?\"?\\?\"?([\w-]+)", cmd.command)
    if re.search(r"(?<!\S)-DMODULE(?!\S)", cmd.command):
        if not m:
            raise InputError(f"{cmd.obj}: module object without KBUILD_MODNAME in its command")
        return ObjectParent(m.group(1).replace("-", "_"), True)
    return ObjectParent("vmlinux", False)


def ipa_dump_of(obj_path: Path) -> Path | None:
    """GCC 12's ``-fdump-ipa-clones`` output for an object (``<obj>.000i.ipa-clones`` or ``<src>.000i...``)."""
    cands = sorted(obj_path.parent.glob(obj_path.stem + ".*ipa-clones"))
    return cands[0] if cands else None


def compile_original(tree: DistroTree, objs: list[str], outdir: Path, jobs: int, log: Path) -> dict[str, Path]:
    """Single-target ``make`` of ``objs`` in the prepared tree; copy each object (and its clone dump) to
    ``outdir/<obj>``. Holds the tree's lock while ``make`` writes into ``build/``."""
    outs: dict[str, Path] = {}
    with tree_lock(tree.lock or tree.build / ".lock"):
        run_logged(make_command(tree, *objs, jobs=jobs), log)
        for o in objs:
            built = tree.build / o
            if not built.is_file():
                raise InputError(f"make {o} produced no object (is its CONFIG option off in the shipped config?)")
            dst = outdir / o
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, dst)
            dump = ipa_dump_of(built)
            if dump is not None:
                shutil.copyfile(dump, dst.parent / dump.name)
            outs[o] = dst
    return outs


def make_overlay_all(tree: DistroTree, patches: list[SourcePatch], objs: list[str], overlay: Path) -> None:
    """Copy the patched files and the objects' ``.c`` files into ``overlay`` and apply ``patches`` there in
    order (one cumulative change); the cached source is only read."""
    wanted = {f for p in patches for f in p.files} | {o[:-2] + ".c" for o in objs}
    for rel in wanted:
        s = tree.src / rel
        d = overlay / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_file():
            shutil.copy2(s, d)
    for p in patches:
        p.apply(overlay, tree.src)


def overlay_command(command: str, obj: str, src: Path, overlay: Path, out: Path) -> str:
    """Rewrite a recorded compile ``command`` of ``obj`` to compile the overlay's source into ``out``."""
    rel_c = obj[:-2] + ".c"
    cc = CompileCommand(obj, command, src / rel_c)
    cmd = cc.redirected(out, "").replace("  -c -o ", " -c -o ")
    if str(src / rel_c) not in cmd:
        raise InputError(f"the recorded command of {obj} does not name {src / rel_c}")
    cmd = cmd.replace(str(src / rel_c), str(overlay / rel_c))
    from ..kbuild.pipeline import data_include_dir

    # the headers a kpatch-build patch may include (kpatch-macros.h, kpatch-syscall.h, kpatch.h), last:
    # the tree's own headers win
    incs = [f"-I{overlay}/{Path(rel_c).parent}", f"-I{overlay}/include", f"-I{overlay}/arch/x86/include",
            f"-fmacro-prefix-map={overlay}/=", f"-idirafter{data_include_dir()}"]
    first, rest = cmd.split(" ", 1)
    return f"{first} {' '.join(incs)} {rest}"


def compile_patched(tree: DistroTree, objs: list[str], overlay: Path, outdir: Path, jobs: int) -> dict[str, Path]:
    """Compile ``objs`` from the overlay with their recorded commands (run in ``build/``, outputs in ``outdir``)."""
    outs = {o: outdir / o for o in objs}
    for p in outs.values():
        p.parent.mkdir(parents=True, exist_ok=True)

    def one(obj: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        rec = recorded_command(tree, obj)
        cmd = overlay_command(rec.command, obj, tree.src, overlay, outs[obj])
        # the whole recorded line (compiler and post-steps such as objtool) in the release's build root;
        # klpforge.util.proc.run: ended on a signal
        return obj, run(in_root(tree, ["sh", "-c", cmd], cwd=tree.build), cwd=tree.build, capture_output=True,
                        text=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for obj, r in ex.map(one, objs):
            if r.returncode != 0 or not outs[obj].is_file():
                err = "\n".join(ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln.lower())
                raise InputError(f"compiling patched {obj} failed: {(err or r.stderr or r.stdout).strip()[:600]}")
    return outs
