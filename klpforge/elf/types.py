"""numpy record types for ELF tables, raw (as stored, per class and byte order) and normalised.

Tables are read as numpy structured arrays over the file's bytes and converted once to the normalised
64-bit, native-order layout, so the rest of klpforge never cares about class or endianness.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Endian = Literal["<", ">"]

__all__ = ["Endian", "SHDR", "SYM", "RELOC", "raw_shdr", "raw_sym", "raw_rel", "raw_rela"]

#: Normalised section header.
SHDR = np.dtype([
    ("name", "u4"), ("type", "u4"), ("flags", "u8"), ("addr", "u8"), ("offset", "u8"), ("size", "u8"),
    ("link", "u4"), ("info", "u4"), ("addralign", "u8"), ("entsize", "u8"),
])
#: Normalised symbol; ``shndx`` already resolved through ``.symtab_shndx`` when it was ``SHN_XINDEX``.
SYM = np.dtype([
    ("name", "u4"), ("value", "u8"), ("size", "u8"), ("info", "u1"), ("other", "u1"), ("shndx", "u4"),
])
#: Normalised relocation (REL entries get the addend stored in the section bytes, see ``ElfFile.relocs``).
RELOC = np.dtype([("offset", "u8"), ("sym", "u4"), ("type", "u4"), ("addend", "i8")])


def raw_shdr(is64: bool, endian: Endian) -> np.dtype:
    """Section header as stored: ``Elf64_Shdr`` or ``Elf32_Shdr`` in byte order ``endian`` ('<' or '>')."""
    w = "u8" if is64 else "u4"
    return np.dtype([
        ("name", "u4"), ("type", "u4"), ("flags", w), ("addr", w), ("offset", w), ("size", w),
        ("link", "u4"), ("info", "u4"), ("addralign", w), ("entsize", w),
    ]).newbyteorder(endian)


def raw_sym(is64: bool, endian: Endian) -> np.dtype:
    """``Elf64_Sym`` / ``Elf32_Sym`` as stored (the two classes order their fields differently)."""
    if is64:
        d = np.dtype([("name", "u4"), ("info", "u1"), ("other", "u1"), ("shndx", "u2"),
                      ("value", "u8"), ("size", "u8")])
    else:
        d = np.dtype([("name", "u4"), ("value", "u4"), ("size", "u4"), ("info", "u1"), ("other", "u1"),
                      ("shndx", "u2")])
    return d.newbyteorder(endian)


def raw_rel(is64: bool, endian: Endian) -> np.dtype:
    """``Elf64_Rel`` / ``Elf32_Rel``."""
    w = "u8" if is64 else "u4"
    return np.dtype([("offset", w), ("info", w)]).newbyteorder(endian)


def raw_rela(is64: bool, endian: Endian) -> np.dtype:
    """``Elf64_Rela`` / ``Elf32_Rela``."""
    w = "u8" if is64 else "u4"
    s = "i8" if is64 else "i4"
    return np.dtype([("offset", w), ("info", w), ("addend", s)]).newbyteorder(endian)
