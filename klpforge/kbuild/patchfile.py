"""A unified-diff source patch: which files it touches, whether it applies, and which it must refuse.

>>> p = SourcePatch.parse(Path("fix.patch"))      # doctest: +SKIP
>>> p.files                                       # doctest: +SKIP
['fs/proc/cmdline.c']
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsafeChange
from ..unidiff import read_patch

__all__ = ["SourcePatch", "refusal_reason"]

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


@dataclass(frozen=True)
class SourcePatch:
    """A parsed patch file; ``files`` are tree-relative paths of the files it changes or creates."""

    path: Path
    strip: int
    files: tuple[str, ...]
    created: tuple[str, ...]
    deleted: tuple[str, ...]

    @classmethod
    def parse(cls, path: Path, strip: int = 1) -> SourcePatch:
        """Read ``path`` (``patch -p<strip>`` convention, default ``-p1`` as git and kpatch-build write),
        with the one parser ``impact --patch`` uses too (:mod:`klpforge.unidiff`)."""
        files: list[str] = []
        created: list[str] = []
        deleted: list[str] = []
        for f in read_patch(path, strip):
            if f.name not in files:
                files.append(f.name)
            if f.old is None and f.new:
                created.append(f.new)
            if f.new is None and f.old:
                deleted.append(f.old)
        return cls(path, strip, tuple(files), tuple(created), tuple(deleted))

    def refuse_unpatchable(self) -> None:
        """Raise :class:`UnsafeChange` naming the first file a live patch cannot change."""
        reasons = [f"{f}: {r}" for f in self.files if (r := refusal_reason(f))]
        if reasons:
            raise UnsafeChange(reasons)

    def _patch(self, src: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["patch", f"-p{self.strip}", "--forward", "--batch", "--no-backup-if-mismatch",
             "-r", "-", "-d", str(src), "-i", str(self.path.resolve()), *extra],
            capture_output=True, text=True, check=False)

    def dry_run(self, src: Path) -> None:
        """``patch --dry-run``; raise :class:`InputError` with patch's complaint if it does not apply."""
        r = self._patch(src, "--dry-run")
        if r.returncode != 0:
            msg = " ".join((r.stdout + r.stderr).split())
            raise InputError(f"{self.path.name} does not apply to {src}: {msg[:400]}")

    def apply(self, src: Path) -> None:
        """Apply for real (callers hold a :class:`~klpforge.kbuild.restore.TreeGuard`)."""
        r = self._patch(src)
        if r.returncode != 0:
            msg = " ".join((r.stdout + r.stderr).split())
            raise InputError(f"{self.path.name} failed to apply to {src}: {msg[:400]}")
