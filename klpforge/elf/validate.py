"""Structural validation of a relocatable object: everything the diff reads and the livepatch object
inherits must be consistent, so a damaged input fails with one line instead of a malformed output.

The rules are those of the System V gABI (sections, symbols, relocations, groups) and the checks GNU
readelf 2.40 warns about (``readelf -aW`` on every output must print no warning). Every check is a
vectorised pass over a table, so a ``vmlinux.o`` with 400k sections costs milliseconds.

>>> validate(ElfFile.open("out.o"))   # raises InputError("out.o: corrupt: ...") on the first problem
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..util.arrays import isin
from . import constants as C
from .file import ElfFile

__all__ = ["validate", "check_sections", "check_symbols", "check_relocs", "RELOCATABLE_TYPES"]

#: Section types a relocation section may apply to (readelf 2.40 ``process_section_headers``), besides
#: every type from ``SHT_LOOS`` up (``SHT_X86_64_UNWIND``, ``SHT_ARM_EXIDX``...).
_SHT_PREINIT_ARRAY, _SHT_DYNSYM, _SHT_LOOS = 16, 11, 0x60000000
RELOCATABLE_TYPES = (C.SHT_PROGBITS, C.SHT_NOBITS, C.SHT_NOTE, C.SHT_INIT_ARRAY, C.SHT_FINI_ARRAY,
                     _SHT_PREINIT_ARRAY)
#: Sections that cannot hold a symbol's definition: they are ELF metadata, not code or data.
#: (A group section may: gcc -g3 defines the ``wm4.*`` signatures of its DWARF macro groups there.)
_NO_DEFINITIONS = (C.SHT_NULL, C.SHT_SYMTAB, C.SHT_RELA, C.SHT_REL, C.SHT_SYMTAB_SHNDX, _SHT_DYNSYM)
_I64_MAX = (1 << 63) - 1


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_sections(elf: ElfFile) -> None:
    """Section headers: names, string tables, and the links of symbol, relocation and group sections.

    Raises InputError naming the file and the first bad section."""
    sh, n = elf.shdrs, elf.shnum
    fail = elf._fail
    if int(sh["type"][elf.shstrndx]) != C.SHT_STRTAB:
        raise fail(f"corrupt: section-name table [{elf.shstrndx}] is not a string table")
    names_size = int(sh["size"][elf.shstrndx])
    if (sh["name"] >= max(names_size, 1)).any():
        i = _first(sh["name"] >= max(names_size, 1))
        raise fail(f"corrupt: section [{i}] name offset {int(sh['name'][i])} is past the section-name table "
                   f"({names_size} bytes)")
    typ = sh["type"]
    tabs = np.flatnonzero(typ == C.SHT_SYMTAB)
    if len(tabs) > 1:
        raise fail(f"corrupt: {len(tabs)} symbol tables (sections {tabs[0]} and {tabs[1]})")
    st = elf.symtab_index
    if st is not None and int(typ[sh["link"][st]]) != C.SHT_STRTAB:
        raise fail(f"corrupt: symbol table [{st}] links to section {int(sh['link'][st])}, not a string table")
    rel = np.flatnonzero((typ == C.SHT_RELA) | (typ == C.SHT_REL))
    if len(rel):
        if st is None:
            raise fail(f"corrupt: relocation section [{rel[0]}] but no symbol table")
        bad = sh["link"][rel] != st
        if bad.any():
            i = int(rel[bad][0])
            raise fail(f"corrupt: relocation section [{i}] links to section {int(sh['link'][i])}, "
                       f"not the symbol table [{st}]")
        info = sh["info"][rel].astype(np.int64)
        bad = (info == 0) | (info >= n)
        if bad.any():
            i = int(rel[bad][0])
            raise fail(f"corrupt: relocation section [{i}] applies to section {int(sh['info'][i])} of {n}")
        ttype = typ[info]
        bad = ~isin(ttype, RELOCATABLE_TYPES) & (ttype < _SHT_LOOS)
        if bad.any():
            i = int(rel[bad][0])
            raise fail(f"corrupt: relocation section [{i}] applies to section [{int(sh['info'][i])}] of "
                       f"type {int(typ[sh['info'][i]])}, which cannot be relocated")
        bad = ttype == C.SHT_NOBITS
        if bad.any():
            i = int(rel[bad][0])
            raise fail(f"corrupt: relocation section [{i}] applies to zero-filled section [{int(sh['info'][i])}]")
        is_rela = typ[rel] == C.SHT_RELA
        ent = np.where(is_rela, 24 if elf.is64 else 12, 16 if elf.is64 else 8)
        bad = ((sh["entsize"][rel] != 0) & (sh["entsize"][rel] != ent)) | (sh["size"][rel] % ent != 0)
        if bad.any():
            i = int(rel[bad][0])
            raise fail(f"corrupt: relocation section [{i}] size {int(sh['size'][i])} / entry size "
                       f"{int(sh['entsize'][i])} do not fit {int(ent[bad][0])}-byte entries")
    nsym = len(elf.syms)
    for i in np.flatnonzero(typ == C.SHT_GROUP).tolist():
        if int(sh["link"][i]) != st:
            raise fail(f"corrupt: group section [{i}] links to section {int(sh['link'][i])}, not the symbol table")
        if int(sh["info"][i]) >= nsym:
            raise fail(f"corrupt: group section [{i}] signature symbol {int(sh['info'][i])} of {nsym}")
        size = int(sh["size"][i])
        if size < 4 or size % 4:
            raise fail(f"corrupt: group section [{i}] size {size} is not a list of 4-byte words")
        words = np.frombuffer(elf.section_view(i), np.dtype("u4").newbyteorder(elf.endian))
        if ((words[1:] == 0) | (words[1:] >= n)).any():
            raise fail(f"corrupt: group section [{i}] names a member section out of range")
    # SHF_INFO_LINK: sh_info is a section index (readelf 2.40 warns otherwise)
    link_info = ((sh["flags"] & C.SHF_INFO_LINK) != 0) & (typ != C.SHT_REL) & (typ != C.SHT_RELA) & \
        (typ != C.SHT_NOBITS) & ((sh["info"] == 0) | (sh["info"] >= n))
    if link_info.any():
        i = _first(link_info)
        raise fail(f"corrupt: section [{i}] has SHF_INFO_LINK but its info field {int(sh['info'][i])} "
                   "is not a section")
    for i in np.flatnonzero(typ == C.SHT_NOTE).tolist():
        # the emitter cuts special sections entry by entry and keeps their type: a note's content must be
        # notes, and only .note* sections are (gcc, gas and the kernel's ELFNOTE() name them so)
        if not elf.section_names[i].startswith(".note"):
            raise fail(f"corrupt: section [{i}] {elf.section_names[i]} has type SHT_NOTE but is not a .note section")
        _check_notes(elf, i)
    for i in np.flatnonzero(typ == C.SHT_SYMTAB_SHNDX).tolist():
        if int(sh["link"][i]) != st or int(sh["size"][i]) != 4 * nsym:
            raise fail(f"corrupt: extended section index table [{i}] does not match the symbol table")


def _check_notes(elf: ElfFile, i: int) -> None:
    """A ``SHT_NOTE`` section is a list of (namesz, descsz, type, name, desc) records, each part padded
    to 4 bytes (8 for a section aligned to 8, as ``.note.gnu.property`` on 64-bit)."""
    data = elf.section_view(i) if elf.shdrs["type"][i] != C.SHT_NOBITS else memoryview(b"")
    pad = 8 if int(elf.shdrs["addralign"][i]) == 8 else 4
    order: Literal["little", "big"] = "little" if elf.endian == "<" else "big"
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            raise elf._fail(f"corrupt: note section [{i}] ends inside a note header at {pos}")
        namesz = int.from_bytes(data[pos:pos + 4], order)
        descsz = int.from_bytes(data[pos + 4:pos + 8], order)
        desc = -(-(pos + 12 + namesz) // pad) * pad  # the name is padded so the descriptor is aligned
        end = desc + -(-descsz // pad) * pad
        if end > len(data):
            raise elf._fail(f"corrupt: note section [{i}] note at {pos} (name {namesz}, desc {descsz} bytes) "
                            f"runs past the section ({len(data)} bytes)")
        pos = end


def check_symbols(elf: ElfFile) -> None:
    """Symbols: names inside the string table, section indices that name real content sections (or
    the reserved ``SHN_UNDEF``/``SHN_ABS``/``SHN_COMMON``, and ``SHN_LIVEPATCH`` for ``.klp.sym.*``),
    values and sizes inside their section, locals before ``sh_info``. Raises InputError naming the file
    and the first bad symbol."""
    st = elf.symtab_index
    if st is None:
        return
    sh, fail, syms = elf.shdrs, elf._fail, elf.syms
    n = len(syms)
    if n == 0:
        raise fail(f"corrupt: symbol table [{st}] is empty (it must hold at least the null symbol)")
    ent = 24 if elf.is64 else 16
    if int(sh["size"][st]) % ent:
        raise fail(f"corrupt: symbol table size {int(sh['size'][st])} is not a multiple of {ent}")
    first_global = int(sh["info"][st])
    if first_global > n:
        raise fail(f"corrupt: symbol table says its first global is {first_global}, it has {n} symbols")
    bind = syms["info"] >> 4
    late_local = bind[first_global:] == C.STB_LOCAL
    if late_local.any():
        raise fail(f"corrupt: local symbol {first_global + _first(late_local)} comes after the first global "
                   f"({first_global})")
    early_global = bind[1:first_global] != C.STB_LOCAL
    if early_global.any():
        raise fail(f"corrupt: non-local symbol {1 + _first(early_global)} comes before the first global "
                   f"({first_global})")
    strsize = int(sh["size"][sh["link"][st]])
    bad = syms["name"] >= max(strsize, 1)
    if bad.any():
        j = _first(bad)
        raise fail(f"corrupt: symbol {j} name offset {int(syms['name'][j])} is past the string table "
                   f"({strsize} bytes)")

    def name(j: int) -> str:
        return f"symbol {j} ({elf.sym_names[j]!r})" if elf.sym_names[j] else f"symbol {j}"

    ndx, special = syms["shndx"].astype(np.int64), elf.sym_special
    styp = syms["info"] & 0xF
    # with extended numbering a real section index can equal a reserved value: always test `special` too
    is_abs, is_common = special & (ndx == C.SHN_ABS), special & (ndx == C.SHN_COMMON)
    ok_special = is_abs | is_common
    bad = special & ~ok_special
    for j in np.flatnonzero(bad & (ndx == C.SHN_LIVEPATCH)).tolist():
        bad[j] = not elf.sym_names[j].startswith(".klp.sym.")  # kernel 4.7+: klp_resolve_symbols()
    if bad.any():
        j = _first(bad)
        raise fail(f"corrupt: {name(j)} has reserved section index {int(ndx[j]):#x}")
    need_section = (styp == C.STT_SECTION) | (styp == C.STT_FUNC)
    bad = need_section & special
    if bad.any():
        j = _first(bad)
        what = "SHN_ABS" if ndx[j] == C.SHN_ABS else "SHN_COMMON"
        raise fail(f"corrupt: {name(j)} is a {'section' if styp[j] == C.STT_SECTION else 'function'} "
                   f"symbol with section index {what}, not a section")
    bad = (styp == C.STT_SECTION) & (ndx == C.SHN_UNDEF) & (np.arange(n) > 0)
    if bad.any():
        raise fail(f"corrupt: {name(_first(bad))} is a section symbol of no section (SHN_UNDEF)")
    value, size = syms["value"], syms["size"]
    # ABS values are addresses and may use the top bit; everything else is an offset or a size.
    bad = ((value > _I64_MAX) & ~is_abs) | (size > _I64_MAX)
    if bad.any():
        j = _first(bad)
        raise fail(f"corrupt: {name(j)} has value {int(value[j]):#x} / size {int(size[j]):#x} "
                   "(negative or beyond 2^63)")
    real = ~special & (ndx != C.SHN_UNDEF)
    idx = np.flatnonzero(real)
    if len(idx):
        secs = ndx[idx]
        kind = sh["type"][secs]
        bad = isin(kind, _NO_DEFINITIONS)
        if bad.any():
            j = int(idx[bad][0])
            raise fail(f"corrupt: {name(j)} is defined in section [{int(ndx[j])}], which is ELF metadata "
                       f"(type {int(sh['type'][ndx[j]])}), not code or data")
        secsize = sh["size"][secs]
        v, s = value[idx], size[idx]
        bad = (v > secsize) | (s > secsize - np.minimum(v, secsize))
        bad &= styp[idx] != C.STT_FILE
        if bad.any():
            k = _first(bad)
            j = int(idx[k])
            raise fail(f"corrupt: {name(j)} at {int(v[k]):#x} size {int(s[k])} does not fit in section "
                       f"[{int(ndx[j])}] {elf.section_names[int(ndx[j])]} ({int(secsize[k])} bytes)")
    com = is_common
    if com.any():
        align = value[com]
        bad = (align == 0) | ((align & (align - np.uint64(1))) != 0) | (align > (1 << 24)) | (size[com] > 1 << 40)
        if bad.any():
            j = int(np.flatnonzero(com)[bad][0])
            raise fail(f"corrupt: common {name(j)} has alignment {int(value[j])} and size {int(size[j])}")


def check_relocs(elf: ElfFile, rsecs: list[int], rel: np.ndarray, origin: np.ndarray) -> None:
    """Relocation entries (``rel``/``origin`` as :meth:`ElfFile.relocs_bulk` returns them for
    ``rsecs``): each names an existing symbol and a place inside the section it applies to."""
    if not len(rel):
        return
    if int(rel["sym"].max()) >= len(elf.syms):
        k = _first(rel["sym"] >= len(elf.syms))
        raise elf._fail(f"corrupt: relocation section [{rsecs[int(origin[k])]}] names symbol "
                        f"{int(rel['sym'][k])}, the symbol table has {len(elf.syms)}")
    rs = np.asarray(rsecs, np.int64)[origin]
    tgt = elf.shdrs["info"][rs].astype(np.int64)
    size = elf.shdrs["size"][tgt]
    bad = rel["offset"] >= size
    if bad.any():
        k = _first(bad)
        raise elf._fail(f"corrupt: relocation section [{int(rs[k])}] entry at offset {int(rel['offset'][k]):#x} "
                        f"is outside section [{int(tgt[k])}] {elf.section_names[int(tgt[k])]} "
                        f"({int(size[k])} bytes)")


def validate(elf: ElfFile) -> None:
    """Every check above, for a whole relocatable object (inputs and klpforge's own outputs).

    Raises :class:`InputError` ("FILE: corrupt: ...") on the first inconsistency; returns None."""
    if elf.e_type != C.ET_REL:
        raise elf._fail(f"ELF type {elf.e_type}, not a relocatable object")
    check_sections(elf)
    check_symbols(elf)
    sh = elf.shdrs
    rsecs = np.flatnonzero((sh["type"] == C.SHT_RELA) | (sh["type"] == C.SHT_REL)).tolist()
    rel, origin = elf.relocs_bulk(rsecs)
    check_relocs(elf, rsecs, rel, origin)
