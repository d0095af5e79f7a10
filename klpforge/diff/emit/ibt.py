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

import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...elf import ElfFile
from ...elf import constants as C
from ...util.errors import InputError

__all__ = ["sealed_functions", "sealed_in_image", "sealed_in_module", "seal_lists", "image_elf", "address_taken",
           "sealed_refusals", "sealed_reason", "SEALED_REASON"]

#: x86-64 relocation types (psABI)
_R_64, _R_PC32, _R_PLT32, _R_32, _R_32S = 1, 2, 4, 10, 11

def sealed_reason(obj: str = "vmlinux") -> str:
    """Why taking the address of a function ``obj`` (vmlinux or a module) sealed is refused."""
    return (f"whose ENDBR the running kernel sealed {'at boot' if obj == 'vmlinux' else 'when it loaded ' + obj} "
            f"(it is on {obj}'s .ibt_endbr_seal list: no code of {obj} takes its address): an indirect call "
            "through that pointer is a 'Missing ENDBR' fault on a CPU with CET-IBT; call it directly, or take the "
            "address of a function of the patch that calls it")


SEALED_REASON = sealed_reason()


def _seal_places(elf: ElfFile) -> set[int] | None:
    """Addresses of the ENDBRs ``elf``'s ``.ibt_endbr_seal`` lists (``.long endbr - .`` each); None without
    the section (no IBT)."""
    sec = elf.find_section(".ibt_endbr_seal")
    if sec is None:
        return None
    data = np.frombuffer(elf.section_bytes(sec), dtype=np.dtype("<i4"))
    base = int(elf.shdrs["addr"][sec])
    # kernel addresses are above 2**63: unsigned arithmetic, wrapping like the CPU's
    with np.errstate(over="ignore"):
        places = np.uint64(base) + np.arange(len(data), dtype=np.uint64) * np.uint64(4) \
            + data.astype(np.int64).astype(np.uint64)
    return set(places.tolist())


def _by_name(sealed: set[int], funcs: list[tuple[str, int]]) -> dict[str, list[bool]]:
    """Name -> sealed flag per symbol of that name in address order; only names with one sealed."""
    by_name: dict[str, list[int]] = {}
    for name, value in funcs:
        by_name.setdefault(name, []).append(value)
    return {n: [v in sealed for v in sorted(vs)] for n, vs in by_name.items() if any(v in sealed for v in vs)}


def sealed_functions(vmlinux: Path) -> dict[str, list[bool]]:
    """Function name -> for each symbol of that name in address order (6.1 vmlinux ``sympos`` order), is
    its ENDBR sealed by vmlinux's ``.ibt_endbr_seal``; only names with at least one sealed. Empty when
    vmlinux has no such section (no IBT)."""
    elf = ElfFile.open(vmlinux)
    sealed = _seal_places(elf)
    if sealed is None:
        return {}
    funcs = np.flatnonzero((elf.syms["info"] & 0xF) == C.STT_FUNC)
    values = elf.syms["value"].astype(np.uint64)
    return _by_name(sealed, [(elf.sym_names[i], int(values[i])) for i in funcs.tolist()])


def image_elf(vmlinuz: Path) -> ElfFile:
    """The vmlinux ELF inside an x86 ``bzImage`` (a distribution's ``vmlinuz``): the stripped
    ``vmlinux.bin`` (``objcopy -R .comment -S``, arch/x86/boot/compressed/Makefile) that the setup header's
    ``payload_offset``/``payload_length`` (Documentation/x86/boot.rst, protocol 2.08+) locate, decompressed.
    gzip, xz and zstd payloads (the kernel appends the 4-byte uncompressed size, ``*_with_size``); zstd
    through Debian's ``zstd`` binary. Raises :class:`InputError` for anything else."""
    data = vmlinuz.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise InputError(f"{vmlinuz}: not an x86 bzImage (boot protocol 2.08+): cannot read its seal list")
    setup_sects = data[0x1F1] or 4
    off, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + off
    payload = data[start:start + length]
    try:
        if payload[:2] == b"\x1f\x8b":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif payload[:6] == b"\xfd7zXZ\x00":
            out = lzma.LZMADecompressor().decompress(payload)
        elif payload[:4] == b"\x28\xb5\x2f\xfd":
            zstd = shutil.which("zstd")
            if zstd is None:
                raise InputError(f"{vmlinuz}: reading a zstd kernel image needs zstd (Debian package zstd)")
            r = subprocess.run([zstd, "-dc"], input=payload[:-4], capture_output=True, check=False)
            if r.returncode != 0:
                raise InputError(f"{vmlinuz}: its zstd payload does not decompress "
                                 f"({r.stderr.decode(errors='replace').strip()[:200]})")
            out = r.stdout
        else:
            raise InputError(f"{vmlinuz}: kernel payload compression {payload[:4].hex()} is not gzip, xz or zstd")
    except (lzma.LZMAError, zlib.error) as e:
        raise InputError(f"{vmlinuz}: cannot decompress the kernel payload ({e})") from None
    return ElfFile(out, f"{vmlinuz} (payload)")


def sealed_in_image(vmlinuz: Path, symbols: Path) -> dict[str, list[bool]]:
    """:func:`sealed_functions` for a distribution kernel that ships no vmlinux: the seal list from the
    ELF inside ``vmlinuz`` (:func:`image_elf`), the function names and addresses from ``symbols`` (vmlinux,
    ``readelf -sW`` text or the ``/proc/kallsyms`` capture of that image booted with ``nokaslr``, whose
    addresses are the link addresses the seal list holds). Empty when the image has no seal list."""
    from ..symtab import TargetSymtab

    sealed = _seal_places(image_elf(vmlinuz))
    if sealed is None:
        return {}
    st = TargetSymtab.load(symbols, False)
    mask = (1 << 64) - 1
    return _by_name(sealed, [(n, v & mask) for n, v, t, d in zip(st.names, st.values, st.types, st.defined,
                                                                strict=True) if t == C.STT_FUNC and d])


def sealed_in_module(ko: Path) -> dict[str, list[bool]]:
    """:func:`sealed_functions` for a module target: a ``.ko`` keeps its own ``.ibt_endbr_seal`` (objtool
    ``--module --ibt``), which the loader applies (6.1 arch/x86/kernel/module.c ``module_finalize`` ->
    ``apply_ibt_endbr``, 6.12 ``apply_seal_endbr``). Entries are ``R_X86_64_PC32`` relocations
    (``.long endbr - .``): the sealed place is the relocation's symbol plus addend. Flags per name follow
    symtab order (the sympos of a module symbol). Empty without the section."""
    elf = ElfFile.open(ko, require_rel=True)
    sec = elf.find_section(".ibt_endbr_seal")
    rsec = elf.reloc_sections.get(sec) if sec is not None else None
    if sec is None or rsec is None:
        return {}
    rel = elf.relocs(rsec)
    shndx, values = elf.syms["shndx"], elf.syms["value"]
    sealed = {(int(shndx[sy]), int(values[sy]) + int(a)) for sy, a in zip(rel["sym"].tolist(),
                                                                        rel["addend"].tolist(), strict=True)}
    by_name: dict[str, list[bool]] = {}
    for i in np.flatnonzero((elf.syms["info"] & 0xF) == C.STT_FUNC).tolist():
        by_name.setdefault(elf.sym_names[i], []).append((int(shndx[i]), int(values[i])) in sealed)
    return {n: f for n, f in by_name.items() if any(f)}


def seal_lists(binaries: dict[str, Path]) -> Callable[[str], dict[str, list[bool]]]:
    """Target name (``vmlinux`` or a module) -> its sealed functions, read from the linked binary of a kernel
    tree (``vmlinux``: :func:`sealed_functions`; a ``.ko``: :func:`sealed_in_module`) once, when asked;
    empty for a name not in ``binaries`` or a binary that is missing."""
    cache: dict[str, dict[str, list[bool]]] = {}

    def load(obj: str) -> dict[str, list[bool]]:
        if obj not in cache:
            b = binaries.get(obj)
            cache[obj] = {} if b is None or not b.is_file() else \
                sealed_functions(b) if obj == "vmlinux" else sealed_in_module(b)
        return cache[obj]

    return load


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


def sealed_refusals(uses: list[tuple[str, str, int]], vmlinux: Path | dict[str, list[bool]],
                    obj: str = "vmlinux") -> list[str]:
    """One refusal line per (our function, kernel function) where ``uses`` -- ``(function of the patch,
    kernel symbol name, sympos)`` of every address-taking reference into ``obj`` -- names a function ``obj``
    seals (``vmlinux``: the linked vmlinux file, or the map of :func:`sealed_in_image` /
    :func:`sealed_in_module`)."""
    sealed = sealed_functions(vmlinux) if isinstance(vmlinux, Path) else vmlinux
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
            out.append(f"{ours} takes the address of {name}, {sealed_reason(obj)}")
    return out
