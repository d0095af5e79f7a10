"""Fallback for builds without ipa-clones dumps (clang): inlining read from DWARF
``DW_TAG_inlined_subroutine`` entries, turned into the same records a GCC dump would hold.

>>> idx, note = fallback_index(Path("build"), None)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..util.errors import InputError
from ..util.fsutil import open_regular, scratch_dir
from .index import Index, build_index
from .objsyms import read_symbols, syms_text

__all__ = ["inlined_records", "fallback_index"]


def _name(die: Any) -> str | None:
    for attr in ("DW_AT_linkage_name", "DW_AT_name"):
        if attr in die.attributes:
            return str(die.attributes[attr].value.decode())
    if "DW_AT_abstract_origin" in die.attributes:
        return _name(die.get_DIE_from_attribute("DW_AT_abstract_origin"))
    if "DW_AT_specification" in die.attributes:
        return _name(die.get_DIE_from_attribute("DW_AT_specification"))
    return None


def inlined_records(obj: Path) -> list[str]:
    """``Callgraph clone;CALLEE;...;TOP;...;inlining to`` lines for every inlined call in ``obj``'s DWARF.

    >>> inlined_records(Path("inline.o"))  # doctest: +SKIP
    ['Callgraph clone;leaf;0;inline.c;4;0;top_a;0;inline.c;14;0;inlining to', ...]
    """
    from elftools.elf.elffile import ELFFile

    out: list[str] = []
    with open_regular(obj) as fh:
        elf = ELFFile(fh)
        if not elf.has_dwarf_info():
            return out
        dw = elf.get_dwarf_info()
        for cu in dw.iter_CUs():
            top = cu.get_top_DIE()
            cu_file = str(top.attributes["DW_AT_name"].value.decode()) if "DW_AT_name" in top.attributes else "?"
            for sub in top.iter_children():
                if sub.tag != "DW_TAG_subprogram" or "DW_AT_low_pc" not in sub.attributes:
                    continue
                top_name = _name(sub)
                if not top_name:
                    continue
                line = sub.attributes.get("DW_AT_decl_line")
                tl = line.value if line else 0
                stack = list(sub.iter_children())
                while stack:
                    d = stack.pop()
                    if d.tag == "DW_TAG_inlined_subroutine":
                        callee = _name(d)
                        org = d.get_DIE_from_attribute("DW_AT_abstract_origin")
                        cl = org.attributes.get("DW_AT_decl_line")
                        if callee:
                            out.append(f"Callgraph clone;{callee};0;{cu_file};{cl.value if cl else 0};0;"
                                       f"{top_name};0;{cu_file};{tl};0;inlining to")
                    stack.extend(d.iter_children())
    return out


def fallback_index(where: Path, objects: Path | None) -> tuple[Index, str]:
    """An index built from DWARF when ``where`` holds no dumps; raises InputError when there is no
    debug info either."""
    roots = [p for p in (objects, where) if p is not None and p.is_dir()]
    objs = sorted({o for r in roots for o in r.rglob("*.o")})
    if not objs:
        raise InputError(f"{where}: no ipa-clones dumps and no objects found (GCC writes dumps with "
                         "-fdump-ipa-clones; clang writes none)")
    with scratch_dir("klpforge-dwarf-") as tmp:  # the dumps are read into the index before it goes
        dumps = []
        with_dwarf = 0
        for i, o in enumerate(objs):
            recs = inlined_records(o)
            with_dwarf += bool(recs)
            d = tmp / f"{i}_{o.stem}.c.000i.ipa-clones"
            d.write_text("".join(r + "\n" for r in recs))
            (tmp / f"{i}_{o.stem}.o.syms").write_bytes(syms_text(read_symbols(o)))
            dumps.append(d)
        if not with_dwarf:
            raise InputError(f"{where}: no ipa-clones dumps (a clang build?) and no DW_TAG_inlined_subroutine "
                             "in the objects' debug info: rebuild with -g")
        msg = (f"no ipa-clones dumps under {where} (clang does not write them): using DWARF inlined-subroutine "
               f"records of {len(objs)} objects; IPA clones and their callers are not covered")
        idx = build_index(dumps)
        idx.objects = [str(objs[int(i)]) for i in range(len(objs))]
        return idx, msg
