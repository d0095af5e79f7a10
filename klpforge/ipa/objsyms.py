"""Symbol tables and call relocations of ELF objects, read with pyelftools.

This is the only place that opens ELF files for ``impact``; the shared corpus ships ``X.o.syms`` text
instead, which :mod:`klpforge.ipa.symtab` reads directly.

>>> read_symbols("/nonexistent.o")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from ..util.errors import InputError
from ..util.fsutil import open_regular

__all__ = ["Sym", "read_symbols", "syms_text", "reloc_callers"]


class Sym(NamedTuple):
    """One defined symbol: ``Sym("process.cold", "FUNC", "LOCAL", ".text.unlikely.process", 50, 0, 23)``."""

    name: str
    type: str
    bind: str
    section: str
    size: int
    value: int
    shndx: int


def read_symbols(path: str | os.PathLike[str]) -> list[Sym]:
    """Defined symbols of an ELF object (undefined ones left out), in symbol-table order.

    >>> [s.name for s in read_symbols("icf.o") if s.type == "FUNC"]  # doctest: +SKIP
    ['s_a', 's_b', 'use_a', 'use_b']
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open_regular(path) as fh:
            elf = ELFFile(fh)
            tab: Any = elf.get_section_by_name(".symtab")
            if tab is None:
                return []
            names = [s.name for s in elf.iter_sections()]
            out = []
            for s in tab.iter_symbols():
                ndx = s["st_shndx"]
                if ndx == "SHN_UNDEF" or not s.name:
                    continue
                num = ndx if isinstance(ndx, int) else -1
                out.append(Sym(s.name, s["st_info"]["type"].removeprefix("STT_"),
                               s["st_info"]["bind"].removeprefix("STB_"),
                               names[num] if 0 <= num < len(names) else str(ndx),
                               s["st_size"], s["st_value"], num))
            return out
    except (OSError, ELFError, ValueError) as e:
        raise InputError(f"{path}: cannot read ELF symbols: {e}") from None


def syms_text(syms: list[Sym]) -> bytes:
    """Symbols in the corpus ``.syms`` layout (``value size type bind ndx name``), for the vectorised reader.

    >>> syms_text([Sym("f", "FUNC", "GLOBAL", ".text.f", 9, 0, 4)])
    b'0000000000000000 9 FUNC GLOBAL 4 f\\n'
    """
    return "".join(f"{s.value:016x} {s.size} {s.type} {s.bind} {s.shndx if s.shndx >= 0 else 'ABS'} {s.name}\n"
                   for s in syms).encode()


def reloc_callers(path: str | os.PathLike[str], targets: set[str]) -> dict[str, set[str]]:
    """For each name in ``targets``, the functions of the object whose code refers to it (calls or
    address-taking), found from the relocations of executable sections.

    >>> reloc_callers("clones.o", {"scale.constprop.0"})  # doctest: +SKIP
    {'scale.constprop.0': {'use_scale1', 'use_scale2'}}
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    out: dict[str, set[str]] = {t: set() for t in targets}
    try:
        with open_regular(path) as fh:
            elf = ELFFile(fh)
            tab: Any = elf.get_section_by_name(".symtab")
            if tab is None:
                return out
            syms = list(tab.iter_symbols())
            funcs: dict[int, list[tuple[int, int, str]]] = {}
            for s in syms:
                if s["st_info"]["type"] == "STT_FUNC" and isinstance(s["st_shndx"], int):
                    funcs.setdefault(s["st_shndx"], []).append((s["st_value"], s["st_size"], s.name))
            for sec in elf.iter_sections():
                if not isinstance(sec, RelocationSection):
                    continue
                code = sec["sh_info"]
                if not (elf.get_section(code)["sh_flags"] & 0x4):  # SHF_EXECINSTR
                    continue
                for r in sec.iter_relocations():
                    t = syms[r["r_info_sym"]]
                    name = t.name
                    if t["st_info"]["type"] == "STT_SECTION":  # gas rewrites local targets this way
                        at = r["r_addend"] + (4 if r["r_info_type"] in (2, 4) else 0) if r.is_RELA() else 0
                        name = next((fn for v, sz, fn in funcs.get(t["st_shndx"], ())
                                     if v <= at < v + max(sz, 1)), "")
                    if name not in out:
                        continue
                    off = r["r_offset"]
                    for value, size, fn in funcs.get(code, ()):
                        if value <= off < value + max(size, 1) and fn != name:
                            out[name].add(fn)
    except (OSError, ELFError, ValueError) as e:
        raise InputError(f"{path}: cannot read ELF relocations: {e}") from None
    return out
