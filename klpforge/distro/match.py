"""Prove that the source matches the shipped binary before diffing: every function the live patch replaces
must exist in the shipped binary with the size it has in the recompiled original object.

The only difference allowed is branch relaxation (x86_64): with ``-ffunction-sections`` a ``jmp``/``jcc`` to
another function of the same file targets another section, so the assembler must keep the 5-byte
``jmp rel32`` (6-byte ``jcc rel32``) where the shipped object, with all functions in one ``.text``, could
use the 2-byte short form. So ``shipped <= ours <= shipped + 3*jmps + 4*jccs`` over those branches.

Alignment padding: the code GCC 14 emits for Linux 6.12 has alignment directives inside functions (padding with
multi-byte NOPs, e.g. ``cs nopw``) whose length depends on where the function starts in its section: with one
``.text`` (shipped) and with a section per function (here) they differ (``should_abort_scan`` of
``mm/vmscan.c`` 6.12.117: 237 bytes with one ``.text``, 269 with ``-ffunction-sections``, 30 of them NOPs).
This happens only when something inside is aligned more strictly than a function start (16 bytes; the section's
alignment shows it: 64 for ``.text.should_abort_scan``). Then each run of NOPs inside the function counts as
0..31 bytes on the shipped side: the shipped size must lie in
``[ours - nops - relaxation, ours - nops + 31 * runs]`` (6.1's code has no such runs: the rule above).

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
from ..util.errors import InputError

__all__ = ["allowed_growth", "FunctionSize", "object_function_sizes", "check_sizes", "SizeVerdict", "nop_padding"]

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
    """A function of the recompiled object: its size, how much relaxation could explain (``slack``), and
    the bytes and runs of NOP padding inside it (``pad``, ``pad_runs``: alignment that depends on placement)."""

    name: str
    size: int
    slack: int
    pad: int = 0
    pad_runs: int = 0

    def shipped_range(self) -> tuple[int, int]:
        """Sizes the same source may have in a shipped object built with one ``.text``."""
        core = self.size - self.pad
        return core - self.slack, core + 31 * self.pad_runs


def nop_padding(code: bytes) -> tuple[int, int]:
    """``(bytes, runs)`` of NOP instructions in x86_64 ``code`` (capstone), the first two instructions excluded
    (a function's entry: ENDBR and the ``__fentry__`` call or its NOP are not alignment)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    md = Cs(CS_ARCH_X86, CS_MODE_64)
    total = runs = 0
    prev_nop = False
    for k, (_addr, size, mnem, _ops) in enumerate(md.disasm_lite(code, 0)):
        is_nop = mnem.endswith("nop") or mnem in ("nopw", "nopl")
        if is_nop and k > 1:
            total += size
            if not prev_nop:
                runs += 1
        prev_nop = is_nop and k > 1
    return total, runs


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
        start, size = int(syms["value"][i]), int(syms["size"][i])
        code = elf.section_bytes(sh) if elf.section_names[sh].startswith(".text") else b""
        if sh in branch_offs:
            offs = [o - start for o in branch_offs[sh] if start <= o < start + size]
            slack = allowed_growth(code[start:], offs)
        # padding depends on placement only when something inside is aligned more strictly than a function
        # start (16 bytes): the section's alignment is the strictest .p2align in it
        pad, runs = nop_padding(code[start:start + size]) \
            if code and int(elf.shdrs["addralign"][sh]) > 16 else (0, 0)
        out[n] = FunctionSize(n, size, slack, pad, runs)
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
        lo, hi = f.shipped_range()
        if exact:
            ok = lo <= size <= hi
        else:
            ok = lo <= size <= hi + f.slack + 64  # gap up to the next symbol: alignment padding
        if not ok:
            raise InputError(f"source does not match {binary}: {n} is {f.size} bytes when compiled here but "
                             f"{size} bytes in the shipped binary (wrong source version, config or compiler)")
        if not exact:
            note = f"gap to the next kallsyms symbol {size} B, {lo}..{hi} B here"
        elif f.size == size:
            note = "same size"
        else:
            note = (f"{f.size - size:+d} B, within branch relaxation (up to {f.slack}) and alignment padding "
                    f"({f.pad} B in {f.pad_runs} runs)")
        out.append(SizeVerdict(n, f.size, size, ok, note))
    return out
