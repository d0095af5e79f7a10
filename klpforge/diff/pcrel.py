"""Where an x86-64 PC-relative reference really points (read stage helper, capstone-decoded).

The CPU adds a ``%rip``-relative displacement to the address of the *next* instruction, so the assembler
stores ``target - (bytes from the field to the instruction's end)`` as the addend: ``-4`` when the field
ends the instruction, ``-5`` for ``addl $1, x(%rip)`` (an 8-bit immediate follows), ``-8`` for
``movl $7, x(%rip)``. A reference through a section symbol into a section holding one object needs no
decoding (it can only mean that object); one into a section shared by several (``__read_mostly``,
``.bss`` without ``-fdata-sections``) must know the immediate's size, or it names the neighbour.

>>> pcrel_tail(obj, arch_for(62), text_sec, 0x13)  # ``addl $0x1, 0x0(%rip)`` with its field at 0x13
1
"""

from __future__ import annotations

import numpy as np

from ..elf import constants as C
from ..util.arrays import isin
from .arch import Arch
from .model import Object

__all__ = ["pcrel_tail", "pcrel_tails"]

#: x86-64 relocation types whose field is a 32-bit displacement from the next instruction
#: (PC32, PLT32, GOTPCREL, GOTPCRELX, REX_GOTPCRELX)
_X86_PCREL = frozenset({2, 4, 9, 41, 42})


def pcrel_tail(obj: Object, arch: Arch, sec: int, off: int, rtype: int) -> int:
    """Bytes between the end of the 4-byte PC-relative field at ``sec+off`` and the end of its instruction
    (0 when none, for other architectures and relocation types, or outside any decodable function).
    Units: bytes. Decodes the covering function once per object (cached)."""
    if arch.machine != C.EM_X86_64 or rtype not in _X86_PCREL or not 0 < sec < obj.nsec or not obj.is_text(sec):
        return 0
    f = obj.symbol_at(sec, off)
    if f < 0 or obj.stype[f] != C.STT_FUNC:
        return 0
    cache: dict[int, np.ndarray] = obj.__dict__.setdefault("_pcrel_ends", {})
    ends = cache.get(f)
    if ends is None:
        from .disasm import decoder

        lo, hi = obj.sym_range(f)
        code = obj.section_data(sec)[lo:hi]
        ends = cache[f] = np.array([a + n for a, n, _m, _o in decoder(arch).disasm_lite(code, lo)], np.int64)
    k = int(np.searchsorted(ends, off, side="right"))
    if k >= len(ends):
        return 0
    tail = int(ends[k]) - (off + 4)
    return tail if 0 <= tail <= 8 else 0


def pcrel_tails(obj: Object, arch: Arch, rel: np.ndarray, relsec: np.ndarray) -> np.ndarray:
    """:func:`pcrel_tail` for every relocation of ``rel`` (applied to sections ``relsec``) that reaches a
    section shared by several symbols through its section symbol from code; 0 for the rest. Added to the
    addends before they are resolved to symbols, so ``addl $1, b(%rip)`` does not name the symbol before b."""
    out = np.zeros(len(rel), np.int64)
    if arch.machine != C.EM_X86_64 or not len(rel):
        return out
    syms = rel["sym"].astype(np.int64)
    tsec = obj.shndx[syms]
    nmem = np.zeros(obj.nsec + 1, np.int64)
    for sec, members in obj.syms_in_section.items():
        if 0 <= sec < obj.nsec:
            nmem[sec] = len(members)
    text = (obj.shdrs["flags"].astype(np.int64) & C.SHF_EXECINSTR) != 0
    cand = (obj.stype[syms] == C.STT_SECTION) & (tsec > 0) & (tsec < obj.nsec) \
        & (nmem[np.clip(tsec, 0, obj.nsec)] > 1) & isin(rel["type"].astype(np.int64), list(_X86_PCREL)) \
        & text[np.clip(relsec, 0, obj.nsec - 1)]
    for j in np.flatnonzero(cand).tolist():
        out[j] = pcrel_tail(obj, arch, int(relsec[j]), int(rel["offset"][j]), int(rel["type"][j]))
    return out
