"""Which functions a unified diff touches, found by parsing the pre-patch C source with tree-sitter-c.

>>> functions_of_patch(Path("fix.patch"), Path("linux"))  # doctest: +SKIP
(['fs/x.c:foo'], [])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from ..util.unidiff import Hunk, read_patch

__all__ = ["changed_lines", "locate", "functions_in_source", "functions_of_patch"]

def changed_lines(patch: Path, strip: int = 1) -> dict[str, set[int]]:
    """Pre-patch file -> the old line numbers each hunk removes or inserts after, with the one parser
    ``build`` uses too (:mod:`klpforge.util.unidiff`: ``-p1`` by default, so ``a/``, ``src.orig/``, ``linux.orig/``
    prefixes all work). New files (``/dev/null`` before) have no old lines and are left out.

    >>> changed_lines(Path("fix.patch"))  # doctest: +SKIP
    {'demo.c': {10}}
    """
    out: dict[str, set[int]] = {}
    for f in read_patch(patch, strip):
        if f.old is None:
            continue
        cur = out.setdefault(f.old, set())
        for h in f.hunks:
            cur |= h.old_lines_touched()
    if not out:
        raise InputError(f"{patch}: the patch only creates files: no existing function changes")
    return out


def locate(hunk: Hunk, source: list[str], patch: Path, name: str, src: Path) -> int:
    """The line where ``hunk``'s old text (context and removed lines) really is in ``source``: the line
    the hunk names, else the nearest exact match (GNU patch applies a hunk at an offset too).

    Raises InputError naming the patch, the hunk and the source when the text is nowhere: the patch was
    written for another version of the file, and the functions it touches cannot be told."""
    text = [ln[1:] for ln in hunk.lines if ln[:1] in (" ", "-", "")]
    n = len(text)
    if not n:
        return hunk.old_start
    want = hunk.old_start - 1
    for delta in range(0, len(source) + 1):
        for k in ((want,) if delta == 0 else (want - delta, want + delta)):
            if 0 <= k <= len(source) - n and source[k] == text[0] and source[k:k + n] == text:
                return k + 1
    raise InputError(f"{patch}: hunk @@ -{hunk.old_start},{hunk.old_count} @@ of {name} does not match {src}: "
                     "its context is not in the file (a patch for another version?)")


def _hunk_lines(patch: Path, name: str, hunks: tuple[Hunk, ...], src: Path) -> set[int]:
    """Old line numbers the hunks touch, each hunk moved to where its text is in ``src`` (when present)."""
    out: set[int] = set()
    source = src.read_bytes().decode("utf-8", "surrogateescape").split("\n") if src.is_file() else None
    for h in hunks:
        shift = locate(h, source, patch, name, src) - h.old_start if source is not None else 0
        out |= {max(ln + shift, 1) for ln in h.old_lines_touched()}
    return out


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


#: Kernel attribute macros tree-sitter-c cannot know: ``struct {...} __aligned(8) v;`` inside a function is
#: otherwise read as a nested function definition that swallows the rest of the file (nf_conntrack_core.c,
#: nf_nat_core.c in 6.1). Blanked with spaces (newlines kept) so that every line and column stays put.
_ATTRIBUTES = re.compile(
    rb"\b(?:__attribute__|__aligned|__section|__alias|__printf|__scanf|__cleanup|__designated_init"
    rb"|__counted_by|__nonstring)\s*\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)"
    rb"|\b(?:__packed|____cacheline_aligned(?:_in_smp)?|__cacheline_aligned(?:_in_smp)?|__randomize_layout"
    rb"|__no_randomize_layout|__maybe_unused|__always_unused|__read_mostly|__ro_after_init|__aligned_largest"
    rb"|__latent_entropy|__noreturn|__must_check|__cold|__weak|__used)\b")


def _blank_attributes(source: bytes) -> bytes:
    """``source`` with the attribute macros of :data:`_ATTRIBUTES` replaced by as many spaces.

    >>> _blank_attributes(b"struct { int a; } __aligned(8) v;")
    b'struct { int a; }              v;'
    """
    return _ATTRIBUTES.sub(lambda m: bytes(b if b == 0x0A else 0x20 for b in m.group()), source)


def functions_in_source(source: bytes, lines: set[int]) -> list[str]:
    """Names of the function definitions that contain any of ``lines`` (1-based).

    >>> functions_in_source(b"int f(void)\\n{\\n return 1;\\n}\\n", {3})
    ['f']
    """
    tree = _parser().parse(_blank_attributes(source))
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


def functions_of_patch(patch: Path, source_root: Path, objects: Path | None = None, strip: int = 1) -> tuple[
        list[str], list[str]]:
    """``file.c:name`` for every function a patch touches, and notes (files skipped, headers).

    A ``.c`` file whose object (under ``objects``) has debug info is mapped with the object's DWARF line
    table (:mod:`klpforge.ipa.dwarflines`: no source needed); other files by parsing the pre-patch source
    under ``source_root`` with tree-sitter-c.
    """
    from .dwarflines import functions_at_lines

    notes: list[str] = []
    out: list[str] = []
    files: dict[str, tuple[Hunk, ...]] = {}
    for f in read_patch(patch, strip):
        if f.old is not None:
            files[f.old] = files.get(f.old, ()) + f.hunks
    if not files:
        raise InputError(f"{patch}: the patch only creates files: no existing function changes")
    for name, hunks in sorted(files.items()):
        src = source_root / name
        # every hunk must match the source it claims to patch (issue 8), else its functions are guesses
        lines = _hunk_lines(patch, name, hunks, src)
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
