"""Indirect Branch Tracking: a live patch must not take the address of a kernel function whose ENDBR is sealed.

On a kernel with ``CONFIG_X86_KERNEL_IBT`` objtool lists in ``.ibt_endbr_seal`` every ENDBR that no code of
vmlinux needs (the function's address is never taken, Linux 6.1 tools/objtool/check.c
``validate_ibt``/``create_ibt_endbr_seal_sections``); at boot ``apply_seal_endbr()``
(arch/x86/kernel/alternative.c) overwrites each with a 4-byte NOP. New code that takes such a function's
address and calls it through the pointer faults on a CPU with CET-IBT ("Missing ENDBR"): QEMU's software
CPU checks nothing, so ``verify`` cannot show it and the build refuses instead, naming both functions.

The seal list is read from the linked target (vmlinux keeps the section, ``__ibt_endbr_seal`` ..
``__ibt_endbr_seal_end``, arch/x86/kernel/vmlinux.lds.S): entries are ``.long endbr - .``.

>>> sealed_functions(Path("vmlinux"))["is_current_pgrp_orphaned"]    # doctest: +SKIP
[18446744071579000000]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...elf import ElfFile
from ...elf import constants as C

__all__ = ["sealed_functions", "address_taken", "sealed_refusals", "SEALED_REASON"]

#: x86-64 relocation types (psABI)
_R_64, _R_PC32, _R_PLT32, _R_32, _R_32S = 1, 2, 4, 10, 11

SEALED_REASON = ("whose ENDBR the running kernel sealed at boot (it is on vmlinux's .ibt_endbr_seal list: no "
                 "code of vmlinux takes its address): an indirect call through that pointer is a 'Missing "
                 "ENDBR' fault on a CPU with CET-IBT; call it directly, or take the address of a function of "
                 "the patch that calls it")


def sealed_functions(vmlinux: Path) -> dict[str, list[bool]]:
    """Function name -> for each symbol of that name in address order (6.1 vmlinux ``sympos`` order), is
    its ENDBR sealed by vmlinux's ``.ibt_endbr_seal``; only names with at least one sealed. Empty when
    vmlinux has no such section (no IBT)."""
    elf = ElfFile.open(vmlinux)
    sec = elf.find_section(".ibt_endbr_seal")
    if sec is None:
        return {}
    data = np.frombuffer(elf.section_bytes(sec), dtype=np.dtype("<i4"))
    base = int(elf.shdrs["addr"][sec])
    # kernel addresses are above 2**63: unsigned arithmetic, wrapping like the CPU's
    with np.errstate(over="ignore"):
        places = np.uint64(base) + np.arange(len(data), dtype=np.uint64) * np.uint64(4) \
            + data.astype(np.int64).astype(np.uint64)
    sealed = set(places.tolist())
    by_name: dict[str, list[int]] = {}
    funcs = np.flatnonzero((elf.syms["info"] & 0xF) == C.STT_FUNC)
    values = elf.syms["value"].astype(np.uint64)
    for i in funcs.tolist():
        by_name.setdefault(elf.sym_names[i], []).append(int(values[i]))
    return {n: [v in sealed for v in sorted(vs)] for n, vs in by_name.items() if any(v in sealed for v in vs)}


def address_taken(data: bytes, off: int, rtype: int, in_text: bool) -> bool:
    """True when an x86-64 relocation of ``rtype`` at ``off`` of a section holding ``data`` stores an
    address (``lea``/``mov $fn``/a pointer in data) rather than being the target of a direct
    ``call``/``jmp``/``jcc``."""
    if rtype == _R_PLT32:
        return False
    if rtype == _R_PC32 and in_text and off >= 1:
        if data[off - 1] in (0xE8, 0xE9):
            return False
        if off >= 2 and data[off - 2] == 0x0F and 0x80 <= data[off - 1] <= 0x8F:
            return False
    return rtype in (_R_64, _R_PC32, _R_32, _R_32S)


def sealed_refusals(uses: list[tuple[str, str, int]], vmlinux: Path) -> list[str]:
    """One refusal line per (our function, kernel function) where ``uses`` -- ``(function of the patch,
    kernel symbol name, sympos)`` of every address-taking reference -- names a function vmlinux seals."""
    sealed = sealed_functions(vmlinux)
    if not sealed:
        return []
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for ours, name, pos in uses:
        flags = sealed.get(name)
        if not flags:
            continue
        hit = all(flags) if pos == 0 else (pos <= len(flags) and flags[pos - 1])
        if hit and (ours, name) not in seen:
            seen.add((ours, name))
            out.append(f"{ours} takes the address of {name}, {SEALED_REASON}")
    return out
