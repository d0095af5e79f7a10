"""A unified-diff source patch: which files it touches, whether it applies, and which it must refuse.

>>> p = SourcePatch.parse(Path("fix.patch"))      # doctest: +SKIP
>>> p.files                                       # doctest: +SKIP
['fs/proc/cmdline.c']
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsafeChange

__all__ = ["SourcePatch", "refusal_reason"]

_PLUS = re.compile(r"^\+\+\+ (\S+)")
_MINUS = re.compile(r"^--- (\S+)")


def _strip(path: str, n: int) -> str | None:
    if path == "/dev/null":
        return None
    parts = path.split("/")
    return "/".join(parts[n:]) if len(parts) > n else None


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
    if path.endswith(("Makefile", "Kconfig", "Kbuild")) or "/Kconfig" in path:
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
        """Read ``path`` (``patch -p<strip>`` convention, default ``-p1`` as git writes)."""
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise InputError(f"{path}: cannot read patch ({e.strerror})") from None
        files: list[str] = []
        created: list[str] = []
        deleted: list[str] = []
        old: str | None = None
        for line in text.splitlines():
            m = _MINUS.match(line)
            if m:
                old = m.group(1)
                continue
            m = _PLUS.match(line)
            if m and old is not None:
                new = _strip(m.group(1), strip)
                was = _strip(old, strip)
                name = new or was
                if name and name not in files:
                    files.append(name)
                if was is None and new:
                    created.append(new)
                if new is None and was:
                    deleted.append(was)
                old = None
        if not files:
            raise InputError(f"{path}: no file changes found (not a unified diff?)")
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
