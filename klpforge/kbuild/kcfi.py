"""kCFI type hashes of replaced functions: a live patch must keep the original's, or indirect calls trap.

With ``CONFIG_CFI`` (Clang ``-fsanitize=kcfi``, Linux 7.3 ``arch/x86/kernel/cfi.c``) every function that may be
called through a pointer has a preamble ``__cfi_<fn>`` just before it: ``movl $<hash>, %eax`` (``b8`` + 32-bit
hash of the function's type) padded with NOPs to ``CONFIG_FUNCTION_PADDING_CFI``; every indirect call compares
the hash it expects with the 4 bytes at ``target - 15`` (``FUNCTION_PADDING_BYTES``-relative) and traps
(``ud2``, "CFI failure") on a mismatch.

Live patching redirects the *original* function with ftrace (its own preamble stays in place and is what
indirect callers check), but a pointer taken in patched code to a replaced function points at the new copy,
whose preamble must carry the same hash. A patch that changes a replaced function's prototype changes its hash:
callers compiled against the old prototype would trap (or, taking the new copy, the old callers do), so it is
refused, naming the function and both hashes. A function that had no preamble in the running kernel (never
address-taken there) but is taken by address in the patched code and not replaced is refused too: an indirect
call to the running copy would read whatever precedes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from ..util.errors import UnsafeChange

__all__ = ["cfi_hashes", "check_kcfi", "PREFIX"]

PREFIX = "__cfi_"
_LLVM = re.compile(r"\.llvm\.\d+$")


def _stable(name: str) -> str:
    """``name`` without ThinLTO's promotion suffix (``.llvm.<module hash>``: it moves with any edit)."""
    return _LLVM.sub("", name)


def cfi_hashes(obj: Path) -> dict[str, int]:
    """``{function: hash}`` for every ``__cfi_<function>`` preamble defined in ``obj`` (an x86-64 ELF
    relocatable); the hash is the immediate of the preamble's ``movl $imm32, %eax`` (opcode ``b8``)."""
    out: dict[str, int] = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        st = elf.get_section_by_name(".symtab")
        if not isinstance(st, SymbolTableSection):
            return out
        data: dict[int, bytes] = {}
        for s in st.iter_symbols():
            if not s.name.startswith(PREFIX) or not isinstance(s["st_shndx"], int):
                continue
            sec = s["st_shndx"]
            if sec not in data:
                data[sec] = elf.get_section(sec).data()
            # the movl is the preamble's last instruction, right before the function (NOPs before it)
            body = data[sec][s["st_value"]:s["st_value"] + s["st_size"]]
            if len(body) >= 5 and body[-5] == 0xB8:
                out[_stable(s.name[len(PREFIX):])] = int.from_bytes(body[-4:], "little")
    return out


def _functions(obj: Path) -> set[str]:
    with obj.open("rb") as f:
        st = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(st, SymbolTableSection):
            return set()
        return {_stable(s.name) for s in st.iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC" and isinstance(s["st_shndx"], int)}


def check_kcfi(obj: str, orig: Path, patched: Path) -> list[str]:
    """Reasons to refuse a patch of ``obj`` for kCFI (empty when all is well): a function of both objects whose
    type hash changes -- replaced, its new copy would not match its callers; not replaced (same code), the
    patched code that now calls it through a pointer expects the new hash from the running copy -- or a
    function of the original that gets a preamble only after the patch (now taken by address): the running
    copy has none."""
    old, new = cfi_hashes(orig), cfi_hashes(patched)
    reasons = []
    for fn in sorted(set(old) & set(new)):
        if old[fn] != new[fn]:
            reasons.append(f"{obj}: {fn}: its kCFI type hash changes from {old[fn]:#010x} to {new[fn]:#010x} "
                           "(the prototype changed): indirect calls compiled against one type would trap on "
                           "the other")
    existed = _functions(orig)
    for fn in sorted(set(new) - set(old)):
        if fn in existed:
            reasons.append(f"{obj}: {fn} is taken by address after the patch but the running kernel's copy "
                           "has no kCFI preamble (it never was): an indirect call to it would trap")
    return reasons


def raise_if(reasons: list[str]) -> None:
    """Raise :class:`UnsafeChange` with ``reasons`` when there are any."""
    if reasons:
        raise UnsafeChange(reasons)
