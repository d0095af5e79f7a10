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
from ..proc import run

__all__ = ["SourcePatch", "refusal_reason"]

_PLUS = re.compile(r"^\+\+\+ (\S+)")
_MINUS = re.compile(r"^--- (\S+)")
_GIT = re.compile(r"^diff --git (\S+) (\S+)$")
_GITHDR = re.compile(r"^(rename from|rename to|copy from|copy to|new file mode|deleted file mode|new mode|"
                     r"old mode) (.+)$")


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
        """Read ``path`` (``patch -p<strip>`` convention, default ``-p1`` as git writes)."""
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise InputError(f"{path}: cannot read patch ({e.strerror})") from None
        files: list[str] = []
        created: list[str] = []
        deleted: list[str] = []
        renamed: list[tuple[str, str]] = []
        copied: list[tuple[str, str]] = []
        modes: list[str] = []
        old: str | None = None
        git_old: str | None = None  # the a/ name of the current "diff --git" section
        git_new: str | None = None
        pending: dict[str, str] = {}  # rename/copy from/to of the current section

        def add(name: str | None) -> None:
            if name and name not in files:
                files.append(name)

        for line in text.splitlines():
            g = _GIT.match(line)
            if g:
                git_old, git_new = _strip(g.group(1), strip), _strip(g.group(2), strip)
                add(git_old)
                add(git_new)
                pending = {}
                old = None
                continue
            h = _GITHDR.match(line)
            if h and git_new is not None:
                key, val = h.group(1), h.group(2)
                if key in ("rename from", "rename to", "copy from", "copy to"):
                    pending[key] = val
                    add(val)
                    if "rename from" in pending and "rename to" in pending:
                        renamed.append((pending.pop("rename from"), pending.pop("rename to")))
                    if "copy from" in pending and "copy to" in pending:
                        copied.append((pending.pop("copy from"), pending.pop("copy to")))
                elif key == "new file mode" and git_new not in created:
                    created.append(git_new)
                elif key == "deleted file mode" and git_old and git_old not in deleted:
                    deleted.append(git_old)
                elif key == "new mode" and git_new not in modes:
                    modes.append(git_new)
                continue
            m = _MINUS.match(line)
            if m:
                old = m.group(1)
                continue
            m = _PLUS.match(line)
            if m and old is not None:
                new = _strip(m.group(1), strip)
                was = _strip(old, strip)
                add(new or was)
                if was is None and new and new not in created:
                    created.append(new)
                if new is None and was and was not in deleted:
                    deleted.append(was)
                old = None
        if not files:
            raise InputError(f"{path}: no file changes found (not a unified diff?)")
        return cls(path, strip, tuple(files), tuple(created), tuple(deleted), tuple(renamed), tuple(copied),
                   tuple(modes))

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
