"""Writing relocatable ELF objects (``ET_REL``) of any class and byte order.

No maintained Python library writes relocatable objects, so this is hand-written: callers add sections,
symbols and relocations by handle; :meth:`ObjectWriter.build` orders the symbol table (locals first, as
the gABI requires), renumbers relocation symbol indices, and lays out the string tables and headers.

>>> w = ObjectWriter(elfclass=64, endian="<", machine=62)
>>> text = w.add_section(".text.f", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, b"\\xc3", addralign=16)
>>> f = w.add_symbol("f", text, 0, 1, STT_FUNC, STB_GLOBAL)
>>> blob = w.build()
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from .constants import (
    ET_REL,
    SHF_INFO_LINK,
    SHN_LORESERVE,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    STB_LOCAL,
)
from .types import RELOC, Endian, raw_rel, raw_rela, raw_shdr, raw_sym

__all__ = ["ObjectWriter", "StringTable", "LINK_SYMTAB"]

#: ``link`` value meaning "the symbol table this writer creates" (for SHT_GROUP and similar sections).
LINK_SYMTAB = -1


class StringTable:
    """An ELF string table that stores each distinct string once."""

    def __init__(self) -> None:
        self._buf = bytearray(b"\0")
        self._index: dict[str, int] = {"": 0}

    def add(self, s: str) -> int:
        """Offset of ``s`` in the table, adding it if new."""
        off = self._index.get(s)
        if off is None:
            off = len(self._buf)
            self._buf += s.encode("utf-8", "surrogateescape") + b"\0"
            self._index[s] = off
        return off

    def bytes(self) -> bytes:
        return bytes(self._buf)


@dataclass
class _Section:
    name: str
    type: int
    flags: int
    data: bytes
    size: int
    addralign: int
    entsize: int
    link: int = 0  # section handle (index in this writer), resolved at build
    info: int = 0
    info_is_section: bool = False
    info_is_symbol: bool = False  # SHT_GROUP: sh_info names the signature symbol (a handle until build)
    relocs: np.ndarray | None = None  # for REL/RELA sections: symbol field holds symbol handles


@dataclass
class _Symbols:
    name: list[str] = field(default_factory=list)
    value: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    info: list[int] = field(default_factory=list)
    other: list[int] = field(default_factory=list)
    shndx: list[int] = field(default_factory=list)  # section handle or SHN_* special value


class ObjectWriter:
    """Collects sections, symbols and relocations; :meth:`build` returns the object file bytes."""

    def __init__(self, elfclass: int, endian: Endian, machine: int, e_flags: int = 0, osabi: int = 0):
        self.is64 = elfclass == 64
        self.endian = endian
        self.machine = machine
        self.e_flags = e_flags
        self.osabi = osabi
        self._secs: list[_Section] = [_Section("", 0, 0, b"", 0, 0, 0)]
        self._syms = _Symbols()
        self.add_symbol("", 0, 0, 0, 0, 0)

    # -- building blocks ------------------------------------------------------------------------------

    def add_section(self, name: str, type: int, flags: int, data: bytes = b"", size: int | None = None,
                    addralign: int = 1, entsize: int = 0, link: int = 0, info: int = 0) -> int:
        """Add a section; returns its handle (which is also its final index)."""
        sz = len(data) if size is None else size
        self._secs.append(_Section(name, type, flags, b"" if type == SHT_NOBITS else data, sz,
                                   addralign, entsize, link, info))
        return len(self._secs) - 1

    def add_symbol(self, name: str, shndx: int, value: int, size: int, type: int, bind: int,
                   other: int = 0) -> int:
        """Add a symbol defined in section handle ``shndx`` (or an ``SHN_*`` value); returns its handle."""
        s = self._syms
        s.name.append(name)
        s.shndx.append(shndx)
        s.value.append(value)
        s.size.append(size)
        s.info.append((bind << 4) | (type & 0xF))
        s.other.append(other)
        return len(s.name) - 1

    def add_relocations(self, target: int, relocs: np.ndarray, name: str | None = None, rela: bool = True,
                        flags: int = SHF_INFO_LINK) -> int:
        """Add a relocation section for section handle ``target``; ``relocs`` is a RELOC array whose
        ``sym`` field holds symbol handles. Returns the new section's handle."""
        tname = self._secs[target].name
        nm = name if name is not None else (".rela" if rela else ".rel") + tname
        entsize = (24 if self.is64 else 12) if rela else (16 if self.is64 else 8)
        h = self.add_section(nm, SHT_RELA if rela else SHT_REL, flags, addralign=8 if self.is64 else 4,
                             entsize=entsize, info=target)
        sec = self._secs[h]
        sec.info_is_section = True
        sec.relocs = np.asarray(relocs, RELOC).copy()
        return h

    def extend_relocations(self, handle: int, relocs: np.ndarray) -> None:
        """Append entries (symbol handles in ``sym``) to the relocation section ``handle``."""
        sec = self._secs[handle]
        if sec.relocs is None:
            raise ValueError(f"{sec.name} is not a relocation section")
        sec.relocs = np.concatenate([sec.relocs, np.asarray(relocs, RELOC)])

    def section_name(self, handle: int) -> str:
        return self._secs[handle].name

    def patch_bytes(self, handle: int, offset: int, data: bytes) -> None:
        """Overwrite ``len(data)`` bytes of section ``handle`` at ``offset`` (within its current data)."""
        sec = self._secs[handle]
        if offset < 0 or offset + len(data) > len(sec.data):
            raise ValueError(f"{sec.name}+{offset:#x}: {len(data)} bytes past the end of the section")
        sec.data = sec.data[:offset] + data + sec.data[offset + len(data):]

    # -- output ---------------------------------------------------------------------------------------

    def build(self) -> bytes:
        """Lay out and return the whole object file."""
        s = self._syms
        n = len(s.name)
        info = np.array(s.info, dtype=np.uint8)
        local = (info >> 4) == STB_LOCAL
        local[0] = True
        order = np.concatenate([np.flatnonzero(local), np.flatnonzero(~local)])
        new_index = np.empty(n, np.int64)
        new_index[order] = np.arange(n)
        first_global = int(local.sum())

        secs = list(self._secs)
        symtab_h = len(secs)
        strtab_h = symtab_h + 1
        shstrtab_h = symtab_h + 2
        nsec = shstrtab_h + 1
        shndx = np.array(s.shndx, dtype=np.int64)
        if nsec >= SHN_LORESERVE:
            # A livepatch object never comes near this; extended numbering is only read, not written.
            raise ValueError(f"too many sections to write ({nsec})")

        strtab = StringTable()
        rs = raw_sym(self.is64, self.endian)
        symtab = np.zeros(n, rs)
        symtab["name"] = [strtab.add(s.name[i]) for i in order]
        symtab["value"] = np.array(s.value, dtype=np.uint64)[order]
        symtab["size"] = np.array(s.size, dtype=np.uint64)[order]
        symtab["info"] = info[order]
        symtab["other"] = np.array(s.other, dtype=np.uint8)[order]
        symtab["shndx"] = shndx[order]

        shstr = StringTable()
        blobs: list[bytes] = []
        headers: list[tuple[int, ...]] = []

        def header(name: str, type_: int, flags: int, size: int, link: int, info_: int, align: int,
                   entsize: int, data: bytes) -> None:
            headers.append((shstr.add(name), type_, flags, size, link, info_, align, entsize))
            blobs.append(data)

        header("", 0, 0, 0, 0, 0, 0, 0, b"")
        for sec in secs[1:]:
            data = sec.data
            link, info_ = sec.link, sec.info
            if sec.relocs is not None:
                r = sec.relocs
                syms_new = new_index[r["sym"].astype(np.int64)]
                rt = (raw_rela if sec.type == SHT_RELA else raw_rel)(self.is64, self.endian)
                raw = np.zeros(len(r), rt)
                raw["offset"] = r["offset"]
                if self.is64:
                    raw["info"] = (syms_new.astype(np.uint64) << np.uint64(32)) | r["type"].astype(np.uint64)
                else:
                    raw["info"] = (syms_new.astype(np.uint64) << np.uint64(8)) | (r["type"] & 0xFF)
                if sec.type == SHT_RELA:
                    raw["addend"] = r["addend"]
                data = raw.tobytes()
                link = symtab_h
            elif link == LINK_SYMTAB:
                link = symtab_h
            if sec.info_is_symbol:
                info_ = int(new_index[info_])
            header(sec.name, sec.type, sec.flags, len(data) if sec.type != SHT_NOBITS else sec.size,
                   link, info_, sec.addralign, sec.entsize, data)
        header(".symtab", SHT_SYMTAB, 0, symtab.nbytes, strtab_h, first_global, 8 if self.is64 else 4,
               rs.itemsize, symtab.tobytes())
        strtab_bytes = strtab.bytes()
        header(".strtab", SHT_STRTAB, 0, len(strtab_bytes), 0, 0, 1, 0, strtab_bytes)
        header(".shstrtab", SHT_STRTAB, 0, 0, 0, 0, 1, 0, b"")  # size filled below
        shstr_bytes = shstr.bytes()
        blobs[shstrtab_h] = shstr_bytes
        h = list(headers[shstrtab_h])
        h[3] = len(shstr_bytes)
        headers[shstrtab_h] = tuple(h)

        ehsize = 64 if self.is64 else 52
        out = bytearray(ehsize)
        offsets = []
        for (_, type_, _, _, _, _, align, _), blob in zip(headers, blobs, strict=True):
            a = max(int(align), 1)
            if type_ == SHT_NOBITS or type_ == 0:
                offsets.append(len(out) if type_ else 0)
                continue
            pad = (-len(out)) % a
            out += bytes(pad)
            offsets.append(len(out))
            out += blob
        out += bytes((-len(out)) % 8)
        shoff = len(out)
        rsh = raw_shdr(self.is64, self.endian)
        table = np.zeros(len(headers), rsh)
        for i, (name, type_, flags, size, link, info_, align, entsize) in enumerate(headers):
            table[i] = (name, type_, flags, 0, offsets[i], size, link, info_, align, entsize)
        shnum_field, shstrndx_field = len(headers), shstrtab_h
        out += table.tobytes()
        ident = b"\x7fELF" + bytes([2 if self.is64 else 1, 1 if self.endian == "<" else 2, 1,
                                    self.osabi]) + bytes(8)
        fmt = self.endian + ("HHIQQQIHHHHHH" if self.is64 else "HHIIIIIHHHHHH")
        hdr = struct.pack(fmt, ET_REL, self.machine, 1, 0, 0, shoff, self.e_flags, ehsize, 0, 0,
                          rsh.itemsize, shnum_field, shstrndx_field)
        out[0:ehsize] = ident + hdr
        return bytes(out)
