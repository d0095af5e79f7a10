"""Reading ELF files: header, sections, symbols, relocations and groups as numpy tables.

Every check that can fail on a damaged file raises :class:`klpforge.util.errors.InputError` with one line
naming the file and what is wrong, so callers never see a traceback.

>>> elf = ElfFile.open("vmlinux.o")
>>> elf.arch, len(elf.shdrs), elf.sym_names[1]
('x86_64', 98765, 'main.c')
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..util.errors import InputError
from ..util.fsutil import open_regular
from . import constants as C
from .types import RELOC, SHDR, SYM, Endian, raw_rel, raw_rela, raw_shdr, raw_sym

__all__ = ["ElfFile", "Group", "cstring_at", "strings_at"]


@dataclass(frozen=True)
class Group:
    """A section group (``SHT_GROUP``): its section index, flags, signature symbol and member sections."""

    index: int
    flags: int
    signature: int
    members: tuple[int, ...]


def cstring_at(buf: bytes, off: int) -> str:
    """The NUL-terminated string starting at ``off`` in ``buf`` (empty when ``off`` is out of range)."""
    if off >= len(buf):
        return ""
    end = buf.find(b"\0", off)
    return buf[off: end if end >= 0 else len(buf)].decode("utf-8", "surrogateescape")


def strings_at(buf: bytes, offsets: np.ndarray) -> list[str]:
    """:func:`cstring_at` for many offsets: split the table once; offsets into the middle of a string
    (suffix sharing, ``.rela.text.f`` → ``.text.f``) fall back to a lookup each."""
    starts: dict[int, str] = {}
    pos = 0
    for piece in buf.split(b"\0"):
        starts[pos] = piece.decode("utf-8", "surrogateescape")
        pos += len(piece) + 1
    out = []
    for o in offsets.tolist():
        s = starts.get(o)
        out.append(s if s is not None else cstring_at(buf, o))
    return out


class ElfFile:
    """An ELF file read into numpy tables. Use :meth:`open` (or pass bytes for tests)."""

    def __init__(self, data: bytes | mmap.mmap, path: str = "<bytes>", require_rel: bool = False):
        self.path = path
        self.data = data
        self._parse_header(require_rel)
        self._parse_sections()
        self._parse_symbols()

    @classmethod
    def open(cls, path: str | os.PathLike[str], require_rel: bool = False) -> ElfFile:
        """Map ``path`` and parse it; ``require_rel`` refuses anything but a relocatable object (ET_REL)."""
        p = Path(path)
        try:
            with open_regular(p) as f:  # a FIFO or /dev/zero is refused, not read for ever
                size = os.fstat(f.fileno()).st_size
                data: bytes | mmap.mmap = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size
                                           else b"")
        except FileNotFoundError:
            raise InputError(f"{p}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{p}: is a directory, not an ELF file") from None
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror}") from None
        return cls(data, str(p), require_rel)

    # -- header ---------------------------------------------------------------------------------------

    def _fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: {what}")

    def _parse_header(self, require_rel: bool) -> None:
        d = self.data
        if len(d) < 16 or d[:4] != b"\x7fELF":
            raise self._fail("not an ELF file (bad magic)")
        ei_class, ei_data = d[4], d[5]
        if ei_class not in (1, 2):
            raise self._fail(f"corrupt ELF header: unknown class {ei_class}")
        if ei_data not in (1, 2):
            raise self._fail(f"corrupt ELF header: unknown byte order {ei_data}")
        self.is64 = ei_class == 2
        self.elfclass = 64 if self.is64 else 32
        self.endian: Endian = "<" if ei_data == 1 else ">"
        self.osabi = d[7]
        fmt = self.endian + ("HHIQQQIHHHHHH" if self.is64 else "HHIIIIIHHHHHH")
        need = 16 + struct.calcsize(fmt)
        if len(d) < need:
            raise self._fail(f"truncated ELF header ({len(d)} bytes, need {need})")
        (self.e_type, self.machine, _version, _entry, _phoff, self.shoff, self.e_flags, _ehsize,
         _phentsize, self.phnum, shentsize, shnum, shstrndx) = struct.unpack_from(fmt, d, 16)
        self.arch = C.MACHINE_NAMES.get(self.machine, f"machine-{self.machine}")
        if require_rel and self.e_type != C.ET_REL:
            kind = {C.ET_EXEC: "an executable", C.ET_DYN: "a shared object"}.get(self.e_type,
                                                                                 f"type {self.e_type}")
            raise self._fail(f"is {kind}, not a relocatable object (.o)")
        if self.shoff == 0:
            raise self._fail("has no section headers")
        want = 64 if self.is64 else 40
        if shentsize != want:
            raise self._fail(f"corrupt ELF header: section header size {shentsize}, expected {want}")
        if shnum == 0 or shstrndx == C.SHN_XINDEX:
            # Extended numbering (more than 65279 sections): counts live in section header 0.
            if self.shoff + want > len(d):
                raise self._fail("truncated: section header table is past the end of the file")
            first = np.frombuffer(d, raw_shdr(self.is64, self.endian), 1, self.shoff)
            if shnum == 0:
                shnum = int(first["size"][0])
            if shstrndx == C.SHN_XINDEX:
                shstrndx = int(first["link"][0])
        self.shnum, self.shstrndx = shnum, shstrndx

    # -- sections -------------------------------------------------------------------------------------

    def _parse_sections(self) -> None:
        d, n = self.data, self.shnum
        rt = raw_shdr(self.is64, self.endian)
        end = self.shoff + n * rt.itemsize
        if end > len(d):
            raise self._fail(f"truncated: section headers end at byte {end}, file has {len(d)}")
        raw = np.frombuffer(d, rt, n, self.shoff)
        sh = np.empty(n, SHDR)
        for f in SHDR.names or ():
            sh[f] = raw[f]
        self.shdrs = sh
        # offset + size can wrap around 2^64 in a damaged header: compare without adding
        size_d = np.uint64(len(d))
        past = (sh["offset"] > size_d) | (sh["size"] > size_d - np.minimum(sh["offset"], size_d))
        bad = (sh["type"] != C.SHT_NOBITS) & (sh["type"] != C.SHT_NULL) & past
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._fail(f"truncated or corrupt: section [{i}] extends past the end of the file "
                             f"(ends at {int(sh['offset'][i]) + int(sh['size'][i])}, file has {len(d)} bytes)")
        align = sh["addralign"]
        bad = (align > (1 << 24)) | ((align & (align - 1)) != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._fail(f"corrupt: section [{i}] alignment {int(align[i])} is not a power of two up to 16 MiB")
        if not 0 < self.shstrndx < n:
            raise self._fail(f"corrupt: section-name table index {self.shstrndx} out of range")
        if (sh["link"] >= n).any():
            i = int(np.flatnonzero(sh["link"] >= n)[0])
            raise self._fail(f"corrupt: section [{i}] links to section {int(sh['link'][i])} of {n}")
        names = self.section_bytes(self.shstrndx)
        self.section_names = strings_at(names, sh["name"])

    def section_bytes(self, i: int) -> bytes:
        """Contents of section ``i`` (zeros for ``SHT_NOBITS``)."""
        h = self.shdrs[i]
        size = int(h["size"])
        if h["type"] == C.SHT_NOBITS:
            if size > 1 << 30:  # zero-fill is materialised: refuse a damaged header's absurd size
                raise self._fail(f"corrupt: zero-filled section [{i}] claims {size} bytes")
            return bytes(size)
        off = int(h["offset"])
        return bytes(self.data[off: off + size])

    def section_view(self, i: int) -> memoryview:
        """Contents of a non-NOBITS section ``i`` as a view of the mapped file (no copy)."""
        off, size = int(self.shdrs["offset"][i]), int(self.shdrs["size"][i])
        return memoryview(self.data)[off: off + size]

    def find_section(self, name: str) -> int | None:
        """Index of the first section called ``name``, or None."""
        try:
            return self.section_names.index(name)
        except ValueError:
            return None

    @cached_property
    def reloc_sections(self) -> dict[int, int]:
        """Target section index → its relocation section index (``.rela.X`` or ``.rel.X``)."""
        sh = self.shdrs
        out: dict[int, int] = {}
        for i in np.flatnonzero((sh["type"] == C.SHT_RELA) | (sh["type"] == C.SHT_REL)):
            tgt = int(sh["info"][i])
            if int(sh["flags"][i]) & C.SHF_RELA_LIVEPATCH:
                continue
            out.setdefault(tgt, int(i))
        return out

    # -- symbols --------------------------------------------------------------------------------------

    def _parse_symbols(self) -> None:
        sh = self.shdrs
        tabs = np.flatnonzero(sh["type"] == C.SHT_SYMTAB)
        self.symtab_index = int(tabs[0]) if len(tabs) else None
        if self.symtab_index is None:
            self.syms = np.zeros(0, SYM)
            self.sym_special = np.zeros(0, bool)
            self.sym_names: list[str] = []
            self.first_global = 0
            return
        i = self.symtab_index
        rt = raw_sym(self.is64, self.endian)
        if int(sh["entsize"][i]) != rt.itemsize:
            raise self._fail(f"corrupt: symbol table entry size {int(sh['entsize'][i])}, "
                             f"expected {rt.itemsize}")
        count = int(sh["size"][i]) // rt.itemsize
        raw = np.frombuffer(self.data, rt, count, int(sh["offset"][i]))
        syms = np.empty(count, SYM)
        for f in SYM.names or ():
            syms[f] = raw[f]
        # SHN_ABS, SHN_COMMON, SHN_LIVEPATCH...: reserved values, not sections. With extended numbering
        # (vmlinux.o has more than 65,280 sections) real indices can be that large too, so keep a mask.
        raw_ndx = syms["shndx"].copy()
        self.sym_special = (raw_ndx >= C.SHN_LORESERVE) & (raw_ndx != C.SHN_XINDEX)
        xi = np.flatnonzero(raw_ndx == C.SHN_XINDEX)
        if len(xi):
            ext = np.flatnonzero((sh["type"] == C.SHT_SYMTAB_SHNDX) & (sh["link"] == i))
            if not len(ext):
                raise self._fail("corrupt: symbols use SHN_XINDEX but there is no .symtab_shndx")
            table = np.frombuffer(self.data, np.dtype("u4").newbyteorder(self.endian), count,
                                  int(sh["offset"][ext[0]]))
            syms["shndx"][xi] = table[xi]
        real = ~self.sym_special
        if (syms["shndx"][real] >= self.shnum).any():
            j = int(np.flatnonzero(real & (syms["shndx"] >= self.shnum))[0])
            raise self._fail(f"corrupt: symbol {j} points at section {int(syms['shndx'][j])} of {self.shnum}")
        self.syms = syms
        self.first_global = int(sh["info"][i])
        strtab = self.section_bytes(int(sh["link"][i]))
        self.sym_names = strings_at(strtab, syms["name"])

    @property
    def sym_type(self) -> np.ndarray:
        """``STT_*`` of every symbol."""
        return self.syms["info"] & 0xF

    @property
    def sym_bind(self) -> np.ndarray:
        """``STB_*`` of every symbol."""
        return self.syms["info"] >> 4

    # -- relocations ----------------------------------------------------------------------------------

    def relocs(self, rsec: int) -> np.ndarray:
        """Entries of relocation section ``rsec`` as a :data:`RELOC` array.

        For ``SHT_REL`` the addend is the signed 32-bit value stored at the relocated place, which is
        what every REL architecture the kernel supports (i386, arm) uses for its data relocations.
        """
        h = self.shdrs[rsec]
        is_rela = int(h["type"]) == C.SHT_RELA
        rt = (raw_rela if is_rela else raw_rel)(self.is64, self.endian)
        if int(h["entsize"]) not in (0, rt.itemsize):
            raise self._fail(f"corrupt: relocation section [{rsec}] entry size {int(h['entsize'])}")
        n = int(h["size"]) // rt.itemsize
        raw = np.frombuffer(self.data, rt, n, int(h["offset"]))
        out = np.empty(n, RELOC)
        out["offset"] = raw["offset"]
        info = raw["info"].astype("u8")
        if self.is64:
            out["sym"] = info >> 32
            out["type"] = info & 0xFFFFFFFF
        else:
            out["sym"] = info >> 8
            out["type"] = info & 0xFF
        if is_rela:
            out["addend"] = raw["addend"]
        else:
            tgt = self.section_bytes(int(h["info"]))
            i4 = np.dtype("i4").newbyteorder(self.endian)
            out["addend"] = [np.frombuffer(tgt, i4, 1, int(o))[0] if int(o) + 4 <= len(tgt) else 0
                             for o in out["offset"]]
        if n and int(out["sym"].max()) >= len(self.syms):
            raise self._fail(f"corrupt: relocation in section [{rsec}] names symbol "
                             f"{int(out['sym'].max())}, the symbol table has {len(self.syms)}")
        return out

    def relocs_bulk(self, rsecs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """All entries of the RELA sections ``rsecs`` in one gather (no per-section array): returns the
        RELOC table and, per entry, the index into ``rsecs`` it came from. REL sections go one by one."""
        rt = raw_rela(self.is64, self.endian)
        sh = self.shdrs
        rs = np.asarray(rsecs, dtype=np.int64)
        rela = sh["type"][rs] == C.SHT_RELA if len(rs) else np.zeros(0, bool)
        bad = rela & (sh["entsize"][rs] != 0) & (sh["entsize"][rs] != rt.itemsize)
        if bad.any():
            raise self._fail(f"corrupt: relocation section [{int(rs[bad][0])}] entry size")
        parts, origin = [], []
        r_idx = np.flatnonzero(rela)
        if len(r_idx):
            counts = (sh["size"][rs[r_idx]] // rt.itemsize).astype(np.int64)
            offs = sh["offset"][rs[r_idx]].astype(np.int64)
            nbytes = counts * rt.itemsize
            total = int(nbytes.sum())
            u8 = np.frombuffer(self.data, np.uint8)
            starts = np.repeat(offs - np.concatenate([[0], np.cumsum(nbytes)[:-1]]), nbytes)
            raw = u8[np.arange(total, dtype=np.int64) + starts].view(rt)
            out = np.empty(len(raw), RELOC)
            out["offset"] = raw["offset"]
            info = raw["info"].astype("u8")
            out["sym"] = info >> 32 if self.is64 else info >> 8
            out["type"] = info & 0xFFFFFFFF if self.is64 else info & 0xFF
            out["addend"] = raw["addend"]
            parts.append(out)
            origin.append(np.repeat(r_idx, counts))
        for k in np.flatnonzero(~rela).tolist():
            r = self.relocs(int(rs[k]))
            parts.append(r)
            origin.append(np.full(len(r), k, np.int64))
        allr = np.concatenate(parts) if parts else np.zeros(0, RELOC)
        if len(allr) and int(allr["sym"].max()) >= len(self.syms):
            raise self._fail(f"corrupt: a relocation names symbol {int(allr['sym'].max())}, "
                             f"the symbol table has {len(self.syms)}")
        return allr, (np.concatenate(origin) if origin else np.zeros(0, np.int64))

    # -- groups ---------------------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        """Every ``SHT_GROUP`` section with its members."""
        out = []
        u4 = np.dtype("u4").newbyteorder(self.endian)
        for i in np.flatnonzero(self.shdrs["type"] == C.SHT_GROUP):
            words = np.frombuffer(self.section_bytes(int(i)), u4)
            if not len(words):
                continue
            out.append(Group(int(i), int(words[0]), int(self.shdrs["info"][i]),
                             tuple(int(w) for w in words[1:])))
        return out
