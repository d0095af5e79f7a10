"""A private view of the kernel source tree in which the files a patch touches are klpforge's own copies.

``klpforge build`` never writes to the user's source or build tree (see ``docs/build-tree.md``). Instead:

1. :meth:`Overlay.snapshot` copies the files the patch names (content and mode) into ``orig/``, copies those
   into ``new/`` and runs ``patch`` there -- a directory of plain files, so patch, including what git's
   extended headers ask for (renames, modes, empty files), cannot reach the tree.
2. :meth:`Overlay.build_view` makes ``view/``: the tree again, but every directory on the way to a touched
   file is a real directory whose other entries are symlinks to the tree. Any path into the tree has the
   same meaning under ``view/``, except that the touched files are the copies.
3. :meth:`Overlay.show` puts the original (``orig``) or patched (``new``) copies at those places, so both
   compiles read their sources from the *same* paths and differ only by the patch.
4. :func:`rewrite_command` turns a recorded Kbuild command into one that reads the tree through ``view/``
   (the source file, ``-I``/``-iquote``/``-include``), with prefix maps so ``__FILE__``, the bug table and
   DWARF name the real tree, exactly as the original build did.

Quote includes search the including file's own directory first (``#include "internal.h"`` in
``fs/proc/cmdline.c``), so copying only the touched files (with ``-I`` overlays in front) would lose the
untouched neighbours of a copied file; the view keeps them, as symlinks. :func:`reads_from_tree` checks the
compiler's dependency list afterwards: no touched file may have been read from the tree itself.

>>> ov = Overlay(Path("linux"), Path("/tmp/x"), ["fs/proc/cmdline.c"])   # doctest: +SKIP
>>> ov.snapshot(patch); ov.build_view(); ov.show("orig")                 # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..util.errors import InputError
from .patchfile import SourcePatch

__all__ = ["Overlay", "rewrite_command", "reads_from_tree", "dep_paths"]


def _under(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip("/") + "/")


class Overlay:
    """The copies and the view of one build; ``root`` is a private (temporary) directory."""

    def __init__(self, src: Path, root: Path, paths: Iterable[str]):
        self.src = src.resolve()
        self.root = root.resolve()
        self.paths = sorted(dict.fromkeys(paths))
        for rel in self.paths:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise InputError(f"{rel}: a patched path must stay inside the source tree")
        self.orig = self.root / "orig"
        self.new = self.root / "new"
        self.view = self.root / "view"

    def snapshot(self, patch: SourcePatch) -> None:
        """Copy the touched files (those that exist) to ``orig/`` and ``new/``, apply ``patch`` in ``new/``.

        One read of each tree file: both compiles use these copies, so a file edited while the build runs
        changes neither. Raises :class:`InputError` if the patch does not apply.
        """
        for rel in self.paths:
            s = self.src / rel
            if s.is_file():
                for d in (self.orig, self.new):
                    (d / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s, self.orig / rel)  # follows a symlink: the content the compiler reads
                os.chmod(self.orig / rel, s.stat().st_mode & 0o7777)
                shutil.copy2(self.orig / rel, self.new / rel)
            elif s.exists() or s.is_symlink():
                raise InputError(f"{rel}: not a regular file in {self.src}")
        self.new.mkdir(parents=True, exist_ok=True)
        patch.apply(self.new, shown=self.src)

    def _dirs(self) -> set[str]:
        """Tree-relative directories to make real in the view: every ancestor of a touched path."""
        out = {""}
        for rel in self.paths:
            parts = Path(rel).parts[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def build_view(self) -> None:
        """Create ``view/``: real directories on the touched paths, symlinks to the tree for the rest."""
        dirs = self._dirs()
        files = set(self.paths)
        for d in sorted(dirs):
            vd = self.view / d
            vd.mkdir(parents=True, exist_ok=True)
            sd = self.src / d
            if not sd.is_dir():
                continue  # a directory the patch creates
            with os.scandir(sd) as it:
                for e in it:
                    rel = f"{d}/{e.name}" if d else e.name
                    if rel in dirs or rel in files:
                        continue
                    os.symlink(e.path, vd / e.name)

    def show(self, which: str) -> None:
        """Put the ``orig`` or ``new`` copies at the touched paths of the view (absent ones removed)."""
        base = {"orig": self.orig, "new": self.new}[which]
        for rel in self.paths:
            v = self.view / rel
            if v.exists() or v.is_symlink():
                v.unlink()
            c = base / rel
            if c.is_file():
                v.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(c, v)

    def changed(self) -> list[str]:
        """Touched paths whose content or mode differs between ``orig`` and ``new``."""
        out = []
        for rel in self.paths:
            a, b = self.orig / rel, self.new / rel
            if a.is_file() != b.is_file():
                out.append(rel)
            elif a.is_file() and (a.read_bytes() != b.read_bytes()
                                  or a.stat().st_mode != b.stat().st_mode):
                out.append(rel)
        return out


# A path argument, bare or glued to an include option (-I/x, -iquote/x); "-include /x" has it separate.
_PATH_TOKEN = re.compile(r"^(-I|-iquote|-isystem|-idirafter)?([./][^\s'\"=;,]*)$")
_PREFIX_MAP = re.compile(r"(?:^|\s)-f(?:macro|file)-prefix-map=(\S*?)=(\S*)")


def rewrite_command(cmd: str, src: Path, build: Path, view: Path) -> str:
    """``cmd`` (run from ``build``, or from ``view`` for an in-tree build) reading the tree through ``view``.

    Every path token naming the source tree -- absolute, or relative to ``build`` when ``srctree`` is
    ``..`` (Linux 6.1 top ``Makefile``) -- becomes the same path under ``view``; paths in the build
    directory stay. Prefix maps are added so the compiler records the real tree's names: for each
    ``-fmacro-prefix-map=SRC/=X`` Kbuild passed (6.1 ``KBUILD_CPPFLAGS``), the same for ``view``, and
    ``-fdebug-prefix-map=VIEW=SRC`` for DWARF.

    >>> rewrite_command("gcc -I/s/include -I./include -fmacro-prefix-map=/s/= -c -o /t/a.o /s/a.c",
    ...                 Path("/s"), Path("/b"), Path("/v"))   # doctest: +NORMALIZE_WHITESPACE
    'gcc -I/v/include -I./include -fmacro-prefix-map=/s/= -c -o /t/a.o /v/a.c
     -fmacro-prefix-map=/v/= -fdebug-prefix-map=/v=/s'
    """
    s, b, v = str(src), str(build), str(view)
    in_tree = s == b
    cwd = v if in_tree else b

    def one(tok: str) -> str:
        m = _PATH_TOKEN.match(tok)
        if not m:
            return tok
        opt, path = m.group(1) or "", m.group(2)
        absolute = path.startswith("/")
        if not absolute and in_tree:
            return tok  # relative to the view already
        full = os.path.normpath(path if absolute else os.path.join(cwd, path))
        if not in_tree and _under(full, b):
            return tok
        if _under(full, s):
            return opt + v + full[len(s):]
        return tok

    parts = re.split(r"(\s+)", cmd)
    out = "".join(p if p.isspace() else one(p) for p in parts)
    extra = []
    for m in _PREFIX_MAP.finditer(cmd):
        old, new = m.group(1), m.group(2)
        full = os.path.normpath(old if old.startswith("/") else os.path.join(cwd, old))
        if not in_tree and _under(full, s) and not _under(full, b):
            extra.append(f"-fmacro-prefix-map={v}{full[len(s):]}{'/' if old.endswith('/') else ''}={new}")
    if not in_tree and not extra:
        extra.append(f"-fmacro-prefix-map={v}/={s}/")
    extra.append(f"-fdebug-prefix-map={v}={s}")
    return _add_flags(out, " ".join(extra))


def _add_flags(cmd: str, flags: str) -> str:
    """Append ``flags`` to the compiler invocation (before ``;`` and post-steps such as objtool)."""
    head, sep, tail = cmd.partition(";")
    return f"{head.rstrip()} {flags}" + (f" {sep}{tail}" if sep else "")


def dep_paths(depfile: Path) -> list[str]:
    """The prerequisites in a gcc ``-MMD`` file (``target: a.c b.h \\``), unescaped."""
    text = depfile.read_text(errors="replace").replace("\\\n", " ")
    _, _, deps = text.partition(":")
    return [d.replace("\\ ", " ") for d in re.split(r"(?<!\\)\s+", deps.split("\n\n")[0]) if d]


def reads_from_tree(depfile: Path, cwd: Path, src: Path, touched: Iterable[str]) -> list[str]:
    """Touched files the compile read from the tree instead of the view (should be empty).

    A ``..`` through a symlinked directory of the view can lead back into the tree; this catches it.
    """
    bad = {str(src / t) for t in touched}
    out = []
    for d in dep_paths(depfile):
        real = os.path.realpath(d if d.startswith("/") else cwd / d)
        if real in bad:
            out.append(d)
    return out
