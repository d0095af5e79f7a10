"""Which functions a source line belongs to, from an object's DWARF (``-g``): the line table and the
``DW_TAG_subprogram`` / ``DW_TAG_inlined_subroutine`` address ranges. Used by ``klpforge impact --patch``
when the build has debug info, so no source tree (and no C parser) is needed.

Addresses cannot tell functions apart in a relocatable object (with ``-ffunction-sections`` every function's
section starts at 0), so lines are used: a function spans from its declaration line (``DW_AT_decl_line`` of
its ``DW_TAG_subprogram``, inlined-only functions included) to the last line that carries code (a line-table
row, in any sequence, inlined copies included) before the next function declared in the same file. C
functions do not nest, so this is exact for function bodies; a change between functions (a global's
initialiser) touches none.

>>> function_extents(Path("inline.o"))["inline.c"]  # doctest: +SKIP
[('leaf', 4, 7), ('mid', 9, 12), ('top_a', 14, 17), ...]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..util.errors import InputError
from ..util.fsutil import open_regular

__all__ = ["function_extents", "functions_at_lines", "has_dwarf"]


def has_dwarf(obj: Path) -> bool:
    """Whether ``obj`` is an ELF file with a line table (built with ``-g``).

    >>> has_dwarf(Path("/nonexistent.o"))
    False
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open_regular(obj) as fh:
            elf = ELFFile(fh)
            return elf.get_section_by_name(".debug_line") is not None and elf.has_dwarf_info()
    except (OSError, ELFError):
        return False


def _attr_int(die: Any, name: str) -> int | None:
    a = die.attributes.get(name)
    return int(a.value) if a is not None and isinstance(a.value, int) else None


def function_extents(obj: Path) -> dict[str, list[tuple[str, int, int]]]:
    """File (as DWARF names it) -> [(function, first line, last line)] for every function defined in
    ``obj``'s compilation units. Raises :class:`InputError` when ``obj`` cannot be read.
    """
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.elf.elffile import ELFFile

    decls: dict[str, dict[str, int]] = {}
    code: dict[str, set[int]] = {}
    try:
        with open_regular(obj) as fh:
            elf = ELFFile(fh)
            if not elf.has_dwarf_info():
                return {}
            dw = elf.get_dwarf_info()
            for cu in dw.iter_CUs():
                lp = dw.line_program_for_CU(cu)
                if lp is None:
                    continue
                files = _file_names(lp)
                for e in lp.get_entries():
                    st = e.state
                    if st is not None and not st.end_sequence and st.line > 0:
                        code.setdefault(_file(files, st.file, lp), set()).add(int(st.line))
                for die in cu.iter_DIEs():
                    if die.tag != "DW_TAG_subprogram" or "DW_AT_declaration" in die.attributes:
                        continue
                    if "DW_AT_abstract_origin" in die.attributes or "DW_AT_specification" in die.attributes:
                        continue  # a concrete copy: its abstract DIE has the declaration
                    name_a = die.attributes.get("DW_AT_name")
                    line = _attr_int(die, "DW_AT_decl_line")
                    if name_a is None or not line:
                        continue
                    f = _file(files, _attr_int(die, "DW_AT_decl_file"), lp)
                    decls.setdefault(f, {}).setdefault(name_a.value.decode(errors="replace"), line)
    except (OSError, ELFError, DWARFError, ValueError) as e:
        raise InputError(f"{obj}: cannot read DWARF line table: {e}") from None
    out: dict[str, list[tuple[str, int, int]]] = {}
    for f, d in decls.items():
        order = sorted(d.items(), key=lambda kv: (kv[1], kv[0]))
        lines = np.array(sorted(code.get(f, ())), np.int64)
        ext = []
        for i, (name, lo) in enumerate(order):
            nxt = order[i + 1][1] if i + 1 < len(order) else 1 << 31
            inside = lines[(lines >= lo) & (lines < nxt)]
            ext.append((name, lo, int(inside.max()) if len(inside) else lo))
        out[f] = ext
    return out


def _file_names(lp: Any) -> list[str]:
    dirs = [d.decode(errors="replace") if isinstance(d, bytes) else str(d)
            for d in lp["include_directory"]]
    names = []
    for fe in lp["file_entry"]:
        n = fe.name.decode(errors="replace") if isinstance(fe.name, bytes) else str(fe.name)
        di = fe.dir_index
        base = dirs[di] if lp.header.version >= 5 and di < len(dirs) else (
            dirs[di - 1] if 0 < di <= len(dirs) else "")
        names.append(n if os.path.isabs(n) or not base or base == "." else os.path.join(base, n))
    return names


def _file(files: list[str], idx: int | None, lp: Any) -> str:
    if idx is None:
        return ""
    i = idx if lp.header.version >= 5 else idx - 1  # DWARF 5 numbers files from 0
    return files[i] if 0 <= i < len(files) else ""


def _same_file(dwarf_name: str, patch_name: str) -> bool:
    d = dwarf_name.replace("\\", "/").removeprefix("./")
    p = patch_name.removeprefix("./")
    return d == p or d.endswith("/" + p) or p.endswith("/" + d)


def functions_at_lines(obj: Path, patch_file: str, lines: set[int]) -> list[str]:
    """Functions of ``obj`` whose extent in ``patch_file`` contains one of ``lines`` (old line numbers).

    >>> functions_at_lines(Path("inline.o"), "inline.c", {5})  # doctest: +SKIP
    ['leaf']
    """
    found: set[str] = set()
    for fname, ext in function_extents(obj).items():
        if not _same_file(fname, patch_file):
            continue
        for name, lo, hi in ext:
            if any(lo <= ln <= hi for ln in lines):
                found.add(name)
    return sorted(found)
