"""The running hypervisor's symbols as Xen's own symbol table names them, read from ``xen-syms``.

Xen 4.17 ``xen/tools/symbols.c`` prefixes every local symbol with the FILE symbol before it:
``common/event_fifo.c#map_guest_page``; globals keep their name. ``symbols_lookup_by_name()``
(``xen/common/symbols.c``) and the payload loader resolve names in exactly that form.

>>> xs = XenSyms.load(Path("xen-syms"))                       # doctest: +SKIP
>>> xs.build_id.hex()                                         # doctest: +SKIP
'39a640e6f1412319235087391df9f1c5e13ae920'
>>> xs.lookup("common/event_fifo.c#map_guest_page").size      # doctest: +SKIP
208
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..elf import ElfFile
from ..elf import constants as C
from ..util.errors import InputError

__all__ = ["XenSym", "XenSyms", "read_build_id", "xen_name", "ENDBR64"]

#: ``endbr64``: with CONFIG_XEN_IBT the jump Xen writes goes after it (``arch/x86/livepatch.c``).
ENDBR64 = b"\xf3\x0f\x1e\xfa"
_NT_GNU_BUILD_ID = 3


def xen_name(name: str, file: str, local: bool) -> str:
    """The name Xen's symbol table gives symbol ``name`` (``file#name`` for a local).

    >>> xen_name("map_guest_page", "common/event_fifo.c", True)
    'common/event_fifo.c#map_guest_page'
    >>> xen_name("evtchn_fifo_destroy", "common/event_fifo.c", False)
    'evtchn_fifo_destroy'
    """
    return f"{file}#{name}" if local and file else name


@dataclass(frozen=True)
class XenSym:
    """One hypervisor symbol: Xen-form name, address, size (bytes), ELF type."""

    name: str
    addr: int
    size: int
    type: int


def _notes(data: bytes, align: int = 4) -> list[tuple[str, int, bytes]]:
    out, off = [], 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off:off + namesz].rstrip(b"\0").decode(errors="replace")
        off += -(-namesz // align) * align
        out.append((name, ntype, data[off:off + descsz]))
        off += -(-descsz // align) * align
    return out


def read_build_id(path: Path) -> bytes:
    """The GNU build-id note of an ELF file (``xen-syms``, the gunzipped ``xen``, a payload).

    Raises :class:`InputError` if there is none."""
    try:
        elf = ElfFile.open(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    for i in range(len(elf.section_names)):
        if int(elf.shdrs["type"][i]) == C.SHT_NOTE:
            for owner, ntype, desc in _notes(elf.section_bytes(i)):
                if owner == "GNU" and ntype == _NT_GNU_BUILD_ID and desc:
                    return desc
    raise InputError(f"{path}: no GNU build-id note (Xen is built with --build-id=sha1)")


class XenSyms:
    """``xen-syms``: symbols by Xen-form name, code bytes, build-id."""

    def __init__(self, path: Path, elf: ElfFile, by_name: dict[str, list[XenSym]], build_id: bytes):
        self.path, self.elf, self.by_name, self.build_id = path, elf, by_name, build_id

    @classmethod
    def load(cls, path: Path) -> XenSyms:
        """Read ``path``; raises :class:`InputError` if it is not an ELF with a symbol table."""
        try:
            elf = ElfFile.open(path)
        except OSError as e:
            raise InputError(f"{path}: cannot read xen-syms ({e.strerror})") from None
        if elf.symtab_index is None:
            raise InputError(f"{path}: no symbol table: pass xen-syms (the -dbg package), not the stripped xen")
        names = elf.sym_names
        info = elf.syms["info"]
        types = (info & 0xF).astype(np.int64)
        binds = (info >> 4).astype(np.int64)
        values = elf.syms["value"].astype(np.uint64)
        sizes = elf.syms["size"].astype(np.int64)
        shndx = elf.syms["shndx"].astype(np.int64)
        by_name: dict[str, list[XenSym]] = {}
        file = ""
        for i in range(1, len(names)):
            t = int(types[i])
            if t == C.STT_FILE:
                file = names[i]
                continue
            if t == C.STT_SECTION or not names[i] or shndx[i] == C.SHN_UNDEF:
                continue
            n = xen_name(names[i], file, int(binds[i]) == C.STB_LOCAL)
            by_name.setdefault(n, []).append(XenSym(n, int(values[i]), int(sizes[i]), t))
        return cls(path, elf, by_name, read_build_id(path))

    def lookup(self, name: str) -> XenSym | None:
        """The symbol Xen finds for ``name``, or None (also None when the name is ambiguous)."""
        hits = self.by_name.get(name)
        return hits[0] if hits and len({h.addr for h in hits}) == 1 else None

    def code(self, addr: int, n: int) -> bytes:
        """``n`` bytes at virtual address ``addr`` from the section holding it (b"" if none)."""
        sh = self.elf.shdrs
        for i in range(1, len(sh)):
            lo = int(sh["addr"][i])
            if int(sh["type"][i]) == C.SHT_PROGBITS and lo <= addr < lo + int(sh["size"][i]):
                return self.elf.section_bytes(i)[addr - lo:addr - lo + n]
        return b""
