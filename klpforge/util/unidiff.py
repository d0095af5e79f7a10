"""The one unified-diff parser: ``klpforge build`` (which files to rebuild) and ``impact --patch`` (which
lines, so which functions) read a patch the same way.

Paths are stripped like ``patch -p<N>`` (default 1): ``a/fs/x.c``, ``b/fs/x.c`` (git), ``src.orig/fs/x.c``
→ ``src/fs/x.c`` (kpatch-build's style) and ``linux.orig/…`` all name ``fs/x.c``. Hunks are read by their
line counts, so a removed line that itself starts with ``-- `` is never taken for a file header. A file
name ends at a tab (``diff -u`` appends timestamps), git's quoting is undone.

>>> [f.name for f in parse_patch("--- src.orig/fs/x.c\\n+++ src/fs/x.c\\n@@ -1 +1 @@\\n-a\\n+b\\n")]
['fs/x.c']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["Hunk", "FilePatch", "parse_patch", "read_patch", "strip_path"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` hunk: old/new start lines (1-based) and counts, and its body lines (with their
    leading ``' '``/``'-'``/``'+'``)."""

    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[str, ...]

    def old_lines_touched(self) -> set[int]:
        """Old line numbers the hunk removes, or inserts after (an insertion before line 1 counts as 1)."""
        out: set[int] = set()
        old = self.old_start
        for line in self.lines:
            if line.startswith("-"):
                out.add(old)
                old += 1
            elif line.startswith("+"):
                out.add(max(old - 1, 1))
            elif line.startswith(" ") or line == "":
                old += 1
        return out


@dataclass(frozen=True)
class FilePatch:
    """The changes to one file: its stripped old and new paths (None for ``/dev/null``) and hunks."""

    old: str | None
    new: str | None
    hunks: tuple[Hunk, ...]
    #: git's extended headers (GNU patch 2.7 carries them out): ``rename``/``copy`` source, new mode
    renamed_from: str | None = None
    copied_from: str | None = None
    new_mode: str | None = None

    @property
    def name(self) -> str:
        """The tree-relative path the change is about (the new one, or the old one of a deletion)."""
        return self.new or self.old or ""


def strip_path(path: str, n: int) -> str | None:
    """``path`` without its first ``n`` components (``patch -p<n>``); None for ``/dev/null`` or a path
    with too few components."""
    if path == "/dev/null":
        return None
    parts = [p for p in path.split("/") if p != ""] if n else [path]
    return "/".join(parts[n:]) if len(parts) > n else None


def _checked(path: str, origin: str, lineno: int) -> str:
    """Refuse a header path that leaves the tree: absolute (GNU patch ``-p1`` would silently strip the
    ``/``) or with a ``..`` component. Raises :class:`InputError` naming the patch line."""
    if path == "/dev/null":
        return path
    if path.startswith("/"):
        raise InputError(f"{origin}:{lineno}: {path}: an absolute path; a patched path must stay inside the "
                         "source tree")
    if ".." in path.split("/"):
        raise InputError(f"{origin}:{lineno}: {path}: a '..' component; a patched path must stay inside the "
                         "source tree")
    return path


def _header_path(rest: str) -> str:
    name = rest.split("\t", 1)[0].rstrip()
    if len(name) >= 2 and name[0] == name[-1] == '"':  # git quotes unusual names, C-style
        name = name[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        name = name.encode("latin-1", "replace").decode("utf-8", "replace")
    return name


_GIT = re.compile(r"^diff --git (\S+) (\S+)$")
_GITHDR = re.compile(r"^(rename from|rename to|copy from|copy to|new file mode|deleted file mode|new mode|"
                     r"old mode|similarity index|dissimilarity index|index) (.+)$")


def _with_ext(fp: FilePatch, ext: dict[str, str]) -> FilePatch:
    if not ext:
        return fp
    return FilePatch(fp.old, fp.new, fp.hunks, renamed_from=ext.get("rename from"),
                     copied_from=ext.get("copy from"), new_mode=ext.get("new mode"))


def parse_patch(text: str, strip: int = 1, origin: str = "patch") -> list[FilePatch]:
    """Every file a unified diff (``diff -u``, ``git diff``/``format-patch``, quilt) changes, in order.

    Raises :class:`InputError` naming ``origin`` when the text holds no file change, or a hunk comes
    before any file header."""
    lines = text.splitlines()
    out: list[FilePatch] = []
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        if line.startswith("@@ ") and _HUNK.match(line):
            raise InputError(f"{origin}:{i + 1}: hunk before any '--- file' header")
        ext: dict[str, str] = {}
        if line.startswith("diff --git "):
            # a git section may carry no ---/+++ at all (an empty new file, a pure rename or mode change)
            g = _GIT.match(line)
            i += 1
            while i < n and _GITHDR.match(lines[i]):
                h = _GITHDR.match(lines[i])
                assert h is not None
                ext[h.group(1)] = h.group(2).strip()
                i += 1
            if g is None:
                continue
            if not (i + 1 < n and lines[i].startswith("--- ") and lines[i + 1].startswith("+++ ")):
                gold = strip_path(_checked(_header_path(g.group(1)), origin, i), strip)
                gnew = strip_path(_checked(_header_path(g.group(2)), origin, i), strip)
                if "rename from" in ext or "copy from" in ext:
                    gold = strip_path("x/" + _checked(ext.get("rename from", ext.get("copy from", "")), origin, i), 1)
                    gnew = strip_path("x/" + _checked(ext.get("rename to", ext.get("copy to", "")), origin, i), 1)
                if "new file mode" in ext:
                    gold = None
                if "deleted file mode" in ext:
                    gnew = None
                if ext and (gold or gnew):
                    out.append(_with_ext(FilePatch(gold, gnew, ()), ext))
                continue
            line = lines[i]
        elif not (line.startswith("--- ") and i + 1 < n and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        old = strip_path(_checked(_header_path(line[4:]), origin, i + 1), strip)
        new = strip_path(_checked(_header_path(lines[i + 1][4:]), origin, i + 2), strip)
        i += 2
        hunks: list[Hunk] = []
        while i < n:
            m = _HUNK.match(lines[i])
            if not m:
                break
            os_, oc = int(m.group(1)), 1 if m.group(2) is None else int(m.group(2))
            ns_, nc = int(m.group(3)), 1 if m.group(4) is None else int(m.group(4))
            i += 1
            body: list[str] = []
            left_old, left_new = oc, nc
            while i < n and (left_old > 0 or left_new > 0):
                b = lines[i]
                if b.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                tag = b[:1]
                if tag == "-":
                    left_old -= 1
                elif tag == "+":
                    left_new -= 1
                elif tag in (" ", ""):
                    left_old -= 1
                    left_new -= 1
                else:
                    break  # a truncated hunk: stop at the first line that is not hunk content
                body.append(b)
                i += 1
            while i < n and lines[i].startswith("\\"):
                i += 1
            hunks.append(Hunk(os_, oc, ns_, nc, tuple(body)))
        if old or new:
            out.append(_with_ext(FilePatch(old, new, tuple(hunks)), ext))
    if not out:
        raise InputError(f"{origin}: no file changes found (not a unified diff?)")
    return out


def read_patch(path: Path, strip: int = 1) -> list[FilePatch]:
    """:func:`parse_patch` of a file; InputError when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise InputError(f"{path}: cannot read patch ({e.strerror})") from None
    return parse_patch(text, strip, str(path))
