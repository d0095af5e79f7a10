"""Prove that the source matches the shipped binary before diffing: every function the live patch replaces
must exist in the shipped binary with the size it has in the recompiled original object.

The only difference allowed is branch relaxation (x86_64): with ``-ffunction-sections`` a ``jmp``/``jcc`` to
another function of the same file targets another section, so the assembler must keep the 5-byte
``jmp rel32`` (6-byte ``jcc rel32``) where the shipped object, with all functions in one ``.text``, could
use the 2-byte short form. So ``shipped <= ours <= shipped + 3*jmps + 4*jccs`` over those branches.

Shipped sizes: ``st_size`` from a module's symbol table; for vmlinux from a ``/proc/kallsyms`` capture,
which has no sizes, the distance to the next symbol (an upper bound including alignment padding).

>>> allowed_growth(b"\\xe9\\0\\0\\0\\0\\x0f\\x85\\0\\0\\0\\0", [1, 7])
7
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..elf import ElfFile
from ..elf import constants as C
from ..errors import InputError

__all__ = ["allowed_growth", "FunctionSize", "object_function_sizes", "check_sizes", "SizeVerdict"]

_PC_BRANCH_TYPES = (2, 4)  # R_X86_64_PC32, R_X86_64_PLT32


def allowed_growth(code: bytes, branch_reloc_offsets: list[int]) -> int:
    """Bytes a function may have gained by unrelaxed branches: 3 per ``jmp rel32``, 4 per ``jcc rel32``."""
    n = 0
    for off in branch_reloc_offsets:
        if off >= 1 and code[off - 1] == 0xE9:
            n += 3
        elif off >= 2 and code[off - 2] == 0x0F and 0x80 <= code[off - 1] <= 0x8F:
            n += 4
    return n


@dataclass(frozen=True)
class FunctionSize:
    """A function of the recompiled object: its size and how much relaxation could explain."""

    name: str
    size: int
    slack: int


def object_function_sizes(obj: Path) -> dict[str, FunctionSize]:
    """``name -> FunctionSize`` for every ``STT_FUNC`` of a function-sections object."""
    elf = ElfFile.open(obj, require_rel=True)
    names = elf.sym_names
    syms = elf.syms
    # Branch relocations to another function's section of this object, grouped by the section they patch.
    text_of_sym = {}
    for i in range(len(names)):
        if int(syms["info"][i]) & 0xF in (C.STT_FUNC, C.STT_SECTION):
            sh = int(syms["shndx"][i])
            if 0 < sh < len(elf.section_names) and elf.section_names[sh].startswith(".text."):
                text_of_sym[i] = sh
    branch_offs: dict[int, list[int]] = {}
    for ri, rname in enumerate(elf.section_names):
        if not rname.startswith(".rela.text."):
            continue
        tgt = int(elf.shdrs["info"][ri])
        for r in elf.relocs(ri):
            s = int(r["sym"])
            if int(r["type"]) in _PC_BRANCH_TYPES and s in text_of_sym and text_of_sym[s] != tgt \
                    and not elf.section_names[text_of_sym[s]].startswith(".text.unlikely."):
                branch_offs.setdefault(tgt, []).append(int(r["offset"]))
    out: dict[str, FunctionSize] = {}
    for i, n in enumerate(names):
        if int(syms["info"][i]) & 0xF != C.STT_FUNC or not n or int(syms["shndx"][i]) == 0:
            continue
        sh = int(syms["shndx"][i])
        slack = 0
        if sh in branch_offs:
            code = elf.section_bytes(sh)
            start = int(syms["value"][i])
            offs = [o - start for o in branch_offs[sh] if start <= o < start + int(syms["size"][i])]
            slack = allowed_growth(code[start:], offs)
        out[n] = FunctionSize(n, int(syms["size"][i]), slack)
    return out


@dataclass(frozen=True)
class SizeVerdict:
    """Outcome for one function: sizes in bytes and whether they match."""

    name: str
    ours: int
    shipped: int | None
    ok: bool
    note: str


def check_sizes(ours: Mapping[str, FunctionSize], shipped: Mapping[str, list[tuple[int, bool]]],
                funcs: list[tuple[str, int]], binary: str) -> list[SizeVerdict]:
    """Compare the replaced functions ``funcs`` (``(name, sympos)``) with the shipped binary's, ``shipped``
    mapping name -> ``[(size, exact), ...]`` in sympos order (exact is False for kallsyms gaps). Raises
    :class:`InputError` naming the first mismatch and both sizes."""
    out = []
    for n, pos in funcs:
        f = ours.get(n)
        if f is None:
            continue  # a function new in the patch: nothing to compare
        cands = shipped.get(n) or []
        if not cands or max(pos, 1) > len(cands):
            raise InputError(f"source does not match {binary}: {n} ({f.size} bytes here) does not exist there "
                             "(wrong source version or config?)")
        size, exact = cands[max(pos, 1) - 1]
        if exact:
            ok = size <= f.size <= size + f.slack
        else:
            ok = f.size <= size <= f.size + f.slack + 64  # gap up to the next symbol: alignment padding
        if not ok:
            raise InputError(f"source does not match {binary}: {n} is {f.size} bytes when compiled here but "
                             f"{size} bytes in the shipped binary (wrong source version, config or compiler)")
        if not exact:
            note = f"gap to the next kallsyms symbol {size} B >= {f.size} B"
        elif f.size == size:
            note = "same size"
        else:
            note = f"{f.size - size:+d} B, within branch relaxation (up to {f.slack})"
        out.append(SizeVerdict(n, f.size, size, ok, note))
    return out
