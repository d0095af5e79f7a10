"""A unified-diff source patch: which files it touches, whether it applies, and which it must refuse.

>>> p = SourcePatch.parse(Path("fix.patch"))      # doctest: +SKIP
>>> p.files                                       # doctest: +SKIP
['fs/proc/cmdline.c']
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError, UnsafeChange
from ..util.proc import run
from ..util.unidiff import read_patch

__all__ = ["SourcePatch", "refusal_reason", "unknown_reach", "C_INCLUDED"]


def refusal_reason(path: str) -> str | None:
    """Why a changed source file cannot be live-patched, or None (Linux 6.1 layout).

    >>> refusal_reason("lib/string.c")
    'lib/ is linked into vmlinux as an archive and partly used before livepatch works'
    >>> refusal_reason("arch/x86/entry/entry_64.S") is not None
    True
    >>> refusal_reason("fs/proc/cmdline.c") is None
    True
    """
    if path.endswith((".S", ".s")):
        return "assembly sources (.S) are not live-patchable"
    if path.startswith("lib/"):
        return "lib/ is linked into vmlinux as an archive and partly used before livepatch works"
    if "/vdso/" in path or "/realmode/" in path or path.startswith(("scripts/", "tools/", "usr/")):
        return "code that does not run in the kernel proper (vdso, realmode, host tools)"
    base = path.rsplit("/", 1)[-1]
    if base in ("Makefile", "Kbuild") or base.startswith(("Kconfig", "Makefile.", "Kbuild.")):
        return "build-system files cannot change in a live patch"
    return None


#: extensions of files a compiler reads through ``#include`` (a changed one that no object records is unused)
C_INCLUDED = (".c", ".h", ".inc", ".def", ".x", ".i")
_TEXT = (".rst", ".txt", ".md", ".yaml", ".json", ".svg", ".png")


def unknown_reach(path: str) -> str | None:
    """Why a changed file that no object records as a dependency may still change the kernel's code, or
    None when it cannot (C sources and includes: then it is simply unused in this configuration;
    documentation and text; ``README``). Shape: a reason for the refusal line. Inputs of generators
    (``arch/x86/entry/syscalls/syscall_64.tbl`` becomes ``asm/syscalls_64.h``, awk and shell scripts,
    device trees) reach objects only through generated files, which a live patch build does not regenerate.

    >>> unknown_reach("arch/x86/entry/syscalls/syscall_64.tbl") is not None
    True
    >>> [unknown_reach(p) for p in ("fs/x.inc", "Documentation/a.rst", "fs/proc/README.klpforge")]
    [None, None, None]
    """
    base = path.rsplit("/", 1)[-1]
    if (path.endswith(C_INCLUDED) or path.endswith(_TEXT) or path.startswith("Documentation/")
            or base.startswith(("README", "MAINTAINERS", "COPYING", "CREDITS", "."))):
        return None
    return ("no compiled object records it as a dependency: it reaches code only through generated files (or "
            "not at all), which cannot be known without a full build")


@dataclass(frozen=True)
class SourcePatch:
    """A parsed patch file; ``files`` are tree-relative paths of every file it changes, creates, deletes,
    renames (both names), copies or changes the mode of.

    git's extended headers (``diff --git``, ``rename from/to``, ``copy from/to``, ``new file mode``,
    ``deleted file mode``, ``old mode``/``new mode``) are read too: GNU patch 2.7 carries them out, and a
    git patch creating an empty file or only changing a mode has no ``---``/``+++`` lines at all.
    """

    path: Path
    strip: int
    files: tuple[str, ...]
    created: tuple[str, ...]
    deleted: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...] = ()
    copied: tuple[tuple[str, str], ...] = ()
    mode_changed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, path: Path, strip: int = 1) -> SourcePatch:
        """Read ``path`` (``patch -p<strip>`` convention, default ``-p1`` as git and kpatch-build write),
        with the one parser ``impact --patch`` uses too (:mod:`klpforge.util.unidiff`)."""
        files: list[str] = []
        created: list[str] = []
        deleted: list[str] = []
        renamed: list[tuple[str, str]] = []
        copied: list[tuple[str, str]] = []
        modes: list[str] = []
        for f in read_patch(path, strip):
            for name in (f.renamed_from, f.copied_from, f.old, f.new):
                if name and name not in files:
                    files.append(name)
            if f.old is None and f.new and f.new not in created:
                created.append(f.new)
            if f.new is None and f.old and f.old not in deleted:
                deleted.append(f.old)
            if f.renamed_from and f.new:
                renamed.append((f.renamed_from, f.new))
            if f.copied_from and f.new:
                copied.append((f.copied_from, f.new))
            if f.new_mode and f.new and f.new not in modes:
                modes.append(f.new)
        return cls(path, strip, tuple(files), tuple(created), tuple(deleted), tuple(renamed), tuple(copied),
                   tuple(modes))

    def check_tree(self, root: Path) -> None:
        """Every file the patch changes (not one it creates) must be a file of ``root``; otherwise raise
        :class:`InputError` naming the path as written in the patch, the ``-p`` level that would match (a
        ``-p0`` patch: ``--- fs/x.c``) and how to fix the patch. Checked before anything is copied or
        compiled, so the error is about the patch, not a failing ``make``."""
        missing = [f for f in self._read_names(self.strip) if not (root / f).is_file()]
        if not missing:
            return
        first = missing[0]
        raw = self._raw_name(first)
        other = next((n for n in (0, 1, 2, 3) if n != self.strip and self._matches(root, n)), None)
        said = f'"{raw}" (-p{self.strip}: {first})' if raw and raw != first else first
        if other is None:
            raise InputError(f"{self.path.name}: {said} is not a file of {root}: is this patch for this "
                             "tree? (klpforge reads -p1 patches, as git writes them)")
        how = ("give its paths a/ and b/ prefixes (git diff writes them; or `sed -i -e 's,^--- ,--- a/,' "
               "-e 's,^+++ ,+++ b/,'` on the patch)" if other == 0 else
               f"remove {other - self.strip} more leading director{'y' if other - self.strip == 1 else 'ies'} "
               "from its paths (klpforge reads -p1 patches, as git writes them)")
        raise InputError(f"{self.path.name}: {said} is not a file of {root}; the patch's paths match the tree "
                         f"as a -p{other} patch: {how}")

    def _raw_name(self, stripped: str) -> str | None:
        try:
            pairs = zip(read_patch(self.path, self.strip), read_patch(self.path, 0), strict=False)
            for s, r in pairs:
                for a, b in ((s.old, r.old), (s.new, r.new)):
                    if a == stripped:
                        return b
        except InputError:
            pass
        return None

    def _read_names(self, strip: int) -> list[str]:
        """The tree files the patch reads at ``-p<strip>``: old sides, rename and copy sources (not the files it
        creates, nor the new names of renames)."""
        out: list[str] = []
        for f in read_patch(self.path, strip):
            for name in (f.renamed_from, f.copied_from, f.old):
                if name and name not in out:
                    out.append(name)
        return out

    def _matches(self, root: Path, strip: int) -> bool:
        try:
            need = self._read_names(strip)
        except InputError:
            return False
        return bool(need) and all((root / f).is_file() for f in need)

    def refuse_unpatchable(self) -> None:
        """Raise :class:`UnsafeChange` naming the first file a live patch cannot change."""
        reasons = [f"{f}: {r}" for f in self.files if (r := refusal_reason(f))]
        if reasons:
            raise UnsafeChange(reasons)

    def _patch(self, src: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return run(["patch", f"-p{self.strip}", "--forward", "--batch", "--no-backup-if-mismatch",
                    "-r", "-", "-d", str(src), "-i", str(self.path.resolve()), *extra],
                   capture_output=True, text=True)

    def apply(self, copy: Path, shown: Path | None = None) -> None:
        """Apply for real to ``copy``, a private copy of the files the patch touches (klpforge never
        patches a user's tree: :mod:`klpforge.kbuild.overlay`); ``shown`` names the tree in messages.

        Raises :class:`InputError` with patch's complaint if it does not apply.
        """
        r = self._patch(copy)
        if r.returncode != 0:
            msg = " ".join((r.stdout + r.stderr).split())
            raise InputError(f"{self.path.name} does not apply to {shown or copy}: {msg[:400]}")
