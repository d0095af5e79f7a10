"""Which functions a unified diff touches, found by parsing the pre-patch C source with tree-sitter-c.

>>> functions_of_patch(Path("fix.patch"), Path("linux"))  # doctest: +SKIP
(['fs/x.c:foo'], [])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["Hunk", "hunks", "changed_lines", "locate", "functions_in_source", "functions_of_patch"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class Hunk:
    """One ``@@`` hunk: where it says it starts in the old file, the old text it expects there (context
    and removed lines), and the 0-based positions in that text the hunk changes."""

    file: str
    patch_line: int
    old_start: int
    old_text: list[str] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)

    def lines_at(self, start: int) -> set[int]:
        """Old line numbers (1-based) the hunk changes when its text starts at line ``start``."""
        return {max(start + k, 1) for k in self.changed}


def hunks(patch: Path) -> dict[str, list[Hunk]]:
    """Pre-patch file -> its hunks (files the patch creates, ``--- /dev/null``, are left out).

    Raises InputError when the patch cannot be read or is not a unified diff."""
    try:
        text = patch.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{patch}: cannot read patch: {e}") from None
    out: dict[str, list[Hunk]] = {}
    cur: list[Hunk] | None = None
    seen_file = False
    h: Hunk | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("--- "):
            name = line[4:].split("\t")[0].strip()
            name = name[2:] if name.startswith(("a/", "b/")) else name
            cur = None if name == "/dev/null" else out.setdefault(name, [])
            seen_file, h = True, None
            continue
        if line.startswith("+++ "):
            continue
        m = _HUNK.match(line)
        if m:
            if not seen_file:
                raise InputError(f"{patch}:{n}: hunk before any '--- file' header")
            h = None
            if cur is not None:
                h = Hunk(name, n, int(m.group(1)))
                cur.append(h)
            continue
        if h is None:
            continue
        if line.startswith("-"):
            h.changed.add(len(h.old_text))
            h.old_text.append(line[1:])
        elif line.startswith("+"):
            # an insertion changes the line before it (or the first line of the file)
            h.changed.add(len(h.old_text) - 1)
        elif line.startswith(" ") or line == "":
            h.old_text.append(line[1:])
    if not seen_file:
        raise InputError(f"{patch}:1: not a unified diff (no '--- file' line)")
    return out


def changed_lines(patch: Path) -> dict[str, set[int]]:
    """Pre-patch file -> the old line numbers each hunk removes or inserts after (as the hunks say).

    >>> changed_lines(Path("fix.patch"))  # doctest: +SKIP
    {'demo.c': {10}}
    """
    return {f: set().union(*(h.lines_at(h.old_start) for h in hs)) if hs else set()
            for f, hs in hunks(patch).items()}


def locate(hunk: Hunk, source: list[str], patch: Path, src: Path) -> int:
    """The line where ``hunk``'s old text really is in ``source``: the stated line, else the nearest
    exact match (as GNU patch applies a hunk at an offset). Raises InputError naming the patch, the hunk
    and the source when the text is nowhere: the patch was written for another version of the file."""
    text, n = hunk.old_text, len(hunk.old_text)
    if not n:
        return hunk.old_start
    want = hunk.old_start - 1
    for delta in range(0, len(source) + 1):
        for k in ((want,) if delta == 0 else (want - delta, want + delta)):
            if 0 <= k <= len(source) - n and source[k] == text[0] and source[k:k + n] == text:
                return k + 1
    raise InputError(f"{patch}:{hunk.patch_line}: hunk @@ -{hunk.old_start} @@ of {hunk.file} does not match "
                     f"{src}: its context is not in the file (a patch for another version?)")


def _parser() -> Any:
    import tree_sitter
    import tree_sitter_c

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_c.language()))


def _name_of(decl: Any) -> str | None:
    """The identifier a function_definition's declarator declares (through pointers and parentheses)."""
    while decl is not None:
        if decl.type == "identifier":
            return str(decl.text.decode())
        if decl.type == "function_declarator":
            decl = decl.child_by_field_name("declarator")
            continue
        nxt = decl.child_by_field_name("declarator")
        if nxt is None:
            ids = [c for c in decl.children if c.type in ("identifier", "function_declarator",
                                                          "parenthesized_declarator", "pointer_declarator")]
            nxt = ids[0] if ids else None
        decl = nxt
    return None


def functions_in_source(source: bytes, lines: set[int]) -> list[str]:
    """Names of the function definitions that contain any of ``lines`` (1-based).

    >>> functions_in_source(b"int f(void)\\n{\\n return 1;\\n}\\n", {3})
    ['f']
    """
    tree = _parser().parse(source)
    found: list[str] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "function_definition":
            lo, hi = node.start_point[0] + 1, node.end_point[0] + 1
            if any(lo <= ln <= hi for ln in lines):
                name = _name_of(node.child_by_field_name("declarator"))
                if name and name not in found:
                    found.append(name)
            continue
        stack.extend(node.children)
    return sorted(found)


def _object_for(name: str, objects: Path | None) -> Path | None:
    """The object built from source file ``name`` under ``objects`` (same relative path, else same file name),
    when it has debug info."""
    from .dwarflines import has_dwarf

    if objects is None or not name.endswith(".c"):
        return None
    stem = Path(name).with_suffix(".o")
    cands = [objects / stem, objects / stem.name]
    if objects.is_dir():
        cands += sorted(objects.rglob(stem.name))
    return next((c for c in cands if c.is_file() and has_dwarf(c)), None)


def functions_of_patch(patch: Path, source_root: Path, objects: Path | None = None) -> tuple[
        list[str], list[str]]:
    """``file.c:name`` for every function a patch touches, and notes (files skipped, headers).

    A ``.c`` file whose object (under ``objects``) has debug info is mapped with the object's DWARF line
    table (:mod:`klpforge.ipa.dwarflines`: no source needed); other files by parsing the pre-patch source
    under ``source_root`` with tree-sitter-c.
    """
    from .dwarflines import functions_at_lines

    notes: list[str] = []
    out: list[str] = []
    for name, hs in sorted(hunks(patch).items()):
        src = source_root / name
        lines: set[int] = set()
        if src.is_file():
            # every hunk must match the source it claims to patch, or its functions would be guessed
            source = src.read_bytes().decode("utf-8", "surrogateescape").split("\n")
            for h in hs:
                lines |= h.lines_at(locate(h, source, patch, src))
        else:
            lines = set().union(*(h.lines_at(h.old_start) for h in hs)) if hs else set()
        obj = _object_for(name, objects)
        if obj is not None:
            funcs = functions_at_lines(obj, name, lines)
            notes.append(f"{name}: functions found from the DWARF line table of {obj}")
        else:
            if not src.is_file():
                raise InputError(f"{patch}: {name} is not in --source {source_root} (and no object with debug "
                                 "info was found for it)")
            funcs = functions_in_source(src.read_bytes(), lines)
        if not funcs:
            notes.append(f"{name}: the patch touches no function body")
        out += [f"{name}:{f}" if name.endswith(".c") else f for f in funcs]
    return out, notes
