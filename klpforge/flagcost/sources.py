"""Which objects a PATH names, and the command Kbuild recorded for each.

A tree is a source directory and a build directory (the same for an in-tree build). Linux 6.1 Kbuild
records ``cmd_<obj> := <command>`` and ``source_<obj> := <file.c>`` in ``<build>/<dir>/.<obj>.cmd``.
A directory PATH means every object under it compiled from C (links such as ``ext4.o``, ``built-in.a``
and modpost's ``*.mod.o`` are left out).

A prepared but unbuilt tree (``--distro``) has no ``.cmd`` files. Then the objects are built once by
Kbuild in a private copy of the build directory (``make O=COPY DIR/`` or ``make O=COPY DIR/X.o``), which
records the commands there; the copy is the working directory of the two compiles and is deleted
afterwards. The source tree is only read (an ``O=`` build never writes into it).

>>> units = find_units(Path("linux"), Path("build"), ["kernel/sched/"])   # doctest: +SKIP
>>> units[0].obj                                                           # doctest: +SKIP
'kernel/sched/build_policy.o'
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..kbuild.tree import cmd_file_of, parse_cmd_file
from ..util.errors import InputError
from ..util.proc import run

__all__ = ["Unit", "find_units", "read_cmd", "record_in_copy", "plain_make", "MakeArgs", "remove_tree"]


@dataclass(frozen=True)
class Unit:
    """One object to measure: build-relative ``obj``, its recorded ``command``, the directory the command
    runs in (``cwd``: the build directory), and its C ``source``."""

    obj: str
    command: str
    cwd: Path
    source: str


def read_cmd(build: Path, obj: str) -> Unit | None:
    """The unit for ``obj`` from its ``.cmd`` file, or None when there is none or it is not a C compile."""
    try:
        text = cmd_file_of(build, obj).read_text(errors="replace")
    except OSError:
        return None
    got = parse_cmd_file(text, obj)
    if got is None or not got[1].endswith(".c"):
        return None
    return Unit(obj, got[0], build, got[1])


def _objects_in(build: Path, rel: str) -> list[str]:
    """Build-relative objects under directory ``rel`` that have a ``.cmd`` file."""
    out = []
    root = build / rel
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.startswith(".") and f.endswith(".o.cmd") and not f.endswith(".mod.o.cmd"):
                out.append(os.path.relpath(os.path.join(d, f[1:-4]), build))
    return out


def _relative(path: str, src: Path, build: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        for root in (build, src):
            if p.resolve().is_relative_to(root):
                return str(p.resolve().relative_to(root))
        raise InputError(f"{path}: not inside the source tree {src} or the build tree {build}")
    return os.path.normpath(path)


#: Builds the ``make`` command for ``targets`` in build directory ``build`` with ``jobs`` jobs.
MakeArgs = Callable[[Path, list[str], int], list[str]]


def plain_make(src: Path) -> MakeArgs:
    """``make -C SRC O=BUILD -jN TARGETS``: an ``O=`` tree prepared with no extra make variables."""
    return lambda build, targets, jobs: ["make", "-C", str(src), f"O={build}", f"-j{jobs}", *targets]


def find_units(src: Path, build: Path, paths: list[str], record: bool = False,
               workdir: Path | None = None, jobs: int = 2, make: MakeArgs | None = None) -> list[Unit]:
    """Units for ``paths`` (objects or directories, tree-relative or absolute).

    With ``record``, objects without a ``.cmd`` are first built by Kbuild in a private copy of ``build``
    under ``workdir`` (see :func:`record_in_copy`). Raises :class:`InputError` for a path that names no
    object compiled from C."""
    rels = [_relative(p, src, build) for p in paths]
    for r in rels:
        here = [src / r, build / r] if not r.endswith(".o") else [src / (r[:-2] + ".c"), build / r]
        if not any(p.exists() for p in here):
            raise InputError(f"{r}: neither an object (.o) nor a directory of the tree"
                             if not r.endswith(".o") else f"{r}: no {r[:-2]}.c in {src} and no {r} in {build}")
    missing = [r for r in rels if not _has_cmds(build, r)]
    if missing and record:
        if workdir is None:
            raise InputError("internal: recording commands needs a work directory")
        build = record_in_copy(src, build, missing, workdir, jobs, make or plain_make(src))
    units: list[Unit] = []
    seen: set[str] = set()
    for r in rels:
        if r.endswith(".o"):
            objs = [r]
        elif (src / r).is_dir() or (build / r).is_dir():
            objs = _objects_in(build, r)
        else:
            raise InputError(f"{r}: neither an object (.o) nor a directory of the tree")
        found = 0
        for o in objs:
            u = read_cmd(build, o)
            if u is None:
                if r.endswith(".o"):
                    has_cmd = (build / Path(o).parent / f".{Path(o).name}.cmd").is_file()
                    why = ("not compiled from C (a link of other objects?)" if has_cmd
                           else f"not built in {build} (no .{Path(o).name}.cmd; is its CONFIG option off?)")
                    raise InputError(f"{o}: {why}")
                continue
            found += 1
            if o not in seen:
                seen.add(o)
                units.append(u)
        if not found:
            raise InputError(f"{r}: no object compiled from C is recorded under it in {build} "
                             "(not built, or its CONFIG options are off)")
    return units


def _has_cmds(build: Path, rel: str) -> bool:
    if rel.endswith(".o"):
        p = build / rel
        return (p.parent / f".{p.name}.cmd").is_file()
    return bool(_objects_in(build, rel))


def record_in_copy(src: Path, build: Path, rels: list[str], workdir: Path, jobs: int, make: MakeArgs) -> Path:
    """Copy ``build`` (a prepared ``O=`` directory) to ``workdir/kbuild`` and let Kbuild build ``rels``
    there (directories get a trailing ``/``: Kbuild's single-directory target). Returns the copy.

    The copy keeps modification times (``cp -a``), so Kbuild rebuilds nothing of ``prepare`` as long as
    ``make`` passes the variables the tree was prepared with (a changed ``KCFLAGS`` would remake
    ``prepare``'s outputs); the commands it records are relative to the build directory, so they run in
    the copy unchanged."""
    if src.resolve() == build.resolve():
        raise InputError(f"{src}: objects {', '.join(rels)} are not built and this is an in-tree build: "
                         "build them first (make " + " ".join(rels) + ")")
    copy = workdir / "kbuild"
    r = run(["cp", "-a", "--reflink=auto", str(build), str(copy)], capture_output=True, text=True)
    if r.returncode:
        raise InputError(f"cannot copy {build}: {r.stderr.strip().splitlines()[-1] if r.stderr else 'cp failed'}")
    targets = [x if x.endswith(".o") else x.rstrip("/") + "/" for x in rels]
    r = run(make(copy, targets, jobs), capture_output=True, text=True)  # own group: ended on a signal
    if r.returncode:
        err = [x for x in r.stderr.splitlines() if "rror" in x] or r.stderr.splitlines()[-1:]
        raise InputError(f"Kbuild could not build {' '.join(targets)} in a copy of {build}: "
                         + (err[0].strip() if err else "make failed"))
    return copy


def remove_tree(p: Path) -> None:
    """Delete a private directory, ignoring what is already gone."""
    shutil.rmtree(p, ignore_errors=True)
