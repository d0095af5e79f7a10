"""Rewriting an existing ELF relocatable object (or ``.ko``): drop sections and symbols, add new ones,
keep everything else byte for byte.

The writer re-creates ``.symtab``, ``.strtab`` and ``.shstrtab``; every other section keeps its bytes,
flags and order, and relocations are re-encoded against the new symbol indices.

>>> rw = Rewriter(ElfFile.open("mod.ko"))
>>> rw.writer.add_symbol(".klp.sym.vmlinux.foo,0", SHN_LIVEPATCH, 0, 0, STT_NOTYPE, STB_GLOBAL)
>>> data = rw.build()
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import constants as C
from .file import ElfFile
from .writer import LINK_SYMTAB, ObjectWriter

__all__ = ["Rewriter"]


class Rewriter:
    """Copies ``elf`` into an :class:`ObjectWriter`; ``sec_map``/``sym_map`` give the new handles."""

    def __init__(self, elf: ElfFile, drop_section: Callable[[int, str], bool] = lambda i, n: False,
                 drop_symbol: Callable[[int, str], bool] = lambda i, n: False):
        self.elf = elf
        self.writer = w = ObjectWriter(elf.elfclass, elf.endian, elf.machine, elf.e_flags, elf.osabi)
        sh = elf.shdrs
        skip_types = (C.SHT_SYMTAB, C.SHT_STRTAB, C.SHT_SYMTAB_SHNDX)
        symtab_strtab = int(sh["link"][elf.symtab_index]) if elf.symtab_index is not None else -1
        self.sec_map: dict[int, int] = {}
        relsecs = []
        for i in range(1, elf.shnum):
            name = elf.section_names[i]
            t = int(sh["type"][i])
            if drop_section(i, name):
                continue
            if t in (C.SHT_RELA, C.SHT_REL):
                relsecs.append(i)
                continue
            if t in skip_types and (t != C.SHT_STRTAB or i in (symtab_strtab, elf.shstrndx)):
                continue
            self.sec_map[i] = w.add_section(name, t, int(sh["flags"][i]), elf.section_bytes(i), size=int(sh["size"][i]),
                                            addralign=int(sh["addralign"][i]), entsize=int(sh["entsize"][i]))
        self.sym_map: dict[int, int] = {0: 0}
        syms = elf.syms
        for i in range(1, len(syms)):
            name = elf.sym_names[i]
            if drop_symbol(i, name):
                continue
            shndx = int(syms["shndx"][i])
            if shndx and not elf.sym_special[i]:
                if shndx not in self.sec_map:
                    continue  # defined in a dropped section
                shndx = self.sec_map[shndx]
            info = int(syms["info"][i])
            self.sym_map[i] = w.add_symbol(name, shndx, int(syms["value"][i]), int(syms["size"][i]), info & 0xF,
                                           info >> 4, int(syms["other"][i]))
        self._fix_links_and_groups()
        for i in relsecs:
            tgt = int(sh["info"][i])
            if tgt not in self.sec_map:
                continue
            r = elf.relocs(i).copy()
            keep = [k for k, s in enumerate(r["sym"].tolist()) if s in self.sym_map]
            r = r[keep]
            r["sym"] = [self.sym_map[int(s)] for s in r["sym"]]
            w.add_relocations(self.sec_map[tgt], r, name=elf.section_names[i],
                              rela=int(sh["type"][i]) == C.SHT_RELA, flags=int(sh["flags"][i]))
            self.sec_map[i] = len(w._secs) - 1

    def _fix_links_and_groups(self) -> None:
        """``sh_link`` (SHF_LINK_ORDER targets, the symbol table) and group contents name sections and
        symbols by index: renumber them."""
        elf, w = self.elf, self.writer
        sh = elf.shdrs
        u4 = np.dtype("u4").newbyteorder(elf.endian)
        for old, new in self.sec_map.items():
            sec = w._secs[new]
            link = int(sh["link"][old])
            if link and link == elf.symtab_index:
                sec.link = LINK_SYMTAB
            elif link in self.sec_map:
                sec.link = self.sec_map[link]
            if sec.type == C.SHT_GROUP:
                words = np.frombuffer(sec.data, u4).copy()
                members = [self.sec_map[m] for m in words[1:].tolist() if m in self.sec_map]
                sec.data = np.array([words[0], *members], dtype=u4).tobytes()
                sec.size = len(sec.data)
                sec.info = self.sym_map.get(int(sh["info"][old]), 0)
                sec.info_is_symbol = True

    def build(self) -> bytes:
        return self.writer.build()
