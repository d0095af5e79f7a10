"""Instruction decoding through capstone (never a hand-written decoder).

>>> instructions(arch_for(62), b"\\xbe\\x2a\\x00\\x00\\x00")
[(5, 'mov', 'esi, 0x2a')]
"""

from __future__ import annotations

from functools import cache
from typing import Any

from .arch import Arch

__all__ = ["instructions", "decoder", "mnemonic_at"]


def decoder(arch: Arch, detail: bool = False) -> Any:
    """A capstone ``Cs`` for ``arch``, shared per (architecture, detail). Detail off unless operand and
    register-access details are needed (several times slower)."""
    return _decoder(arch.cs_arch, arch.cs_mode, detail)  # Arch holds dicts: cache on the hashable part


@cache
def _decoder(cs_arch: str, cs_mode: str, detail: bool) -> Any:
    import capstone

    mode = 0
    for part in cs_mode.split("|"):
        mode |= getattr(capstone, part.strip()) if part.strip() else 0
    md = capstone.Cs(getattr(capstone, cs_arch), mode)
    md.detail = detail
    md.skipdata = True
    return md


def instructions(arch: Arch, code: bytes) -> list[tuple[int, str, str]]:
    """``(size, mnemonic, operands)`` for every instruction in ``code`` (data bytes come out as .byte)."""
    return [(size, mn, ops) for _addr, size, mn, ops in decoder(arch).disasm_lite(code, 0)]


def mnemonic_at(arch: Arch, code: bytes, start: int) -> str:
    """Mnemonic of the one instruction that starts at ``start`` ('' if capstone cannot decode it).

    >>> mnemonic_at(arch_for(21), bytes.fromhex("00000048"), 0)  # ppc64le ``b .``
    'b'
    """
    if not arch.cs_arch:
        return ""
    for _addr, _size, mn, _ops in decoder(arch).disasm_lite(code[start:start + 16], 0, 1):
        return str(mn)
    return ""
