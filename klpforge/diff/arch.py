"""What klpforge needs to know about each architecture: relocation types, function entries, decoding.

The architecture comes from the ELF header's ``e_machine``. Facts that differ: how a PC-relative addend
relates to its target (``pcrel_bias``), the ftrace hook, ppc64's TOC (``.toc`` slots, ``.TOC.``, tail calls),
and capstone's names for the registers a moved ``__LINE__`` is loaded into.

>>> arch_for(62).name
'x86_64'
>>> arch_for(22).pcrel_bias[20]  # s390x R_390_PLT32DBL: ``brasl %r14,f`` stores f+2
-2
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..elf import constants as C
from ..util.errors import InputError

__all__ = ["Arch", "arch_for", "ARCHES"]


@dataclass(frozen=True)
class Arch:
    """Per-architecture facts. ``pcrel_bias``: for PC-relative relocation types, what to add to the addend
    to find the referenced byte (x86 ``lea .LC0(%rip)`` stores ``.LC0 - 4``)."""

    name: str
    machine: int
    abs64: int  # relocation type for a 64-bit absolute address (special-section entries)
    pc32: int  # 32-bit PC-relative
    pcrel_bias: dict[int, int] = field(default_factory=dict)
    fentry_names: tuple[str, ...] = ("__fentry__",)
    # capstone (arch, mode) names, resolved lazily so importing klpforge does not import capstone
    cs_arch: str = ""
    cs_mode: str = ""
    #: mnemonics (capstone's spelling) that load an immediate into a register (a ``__LINE__`` argument;
    #: argument registers per ABI are in klpforge/diff/lineargs.py)
    line_mnemonics: tuple[str, ...] = ()
    #: sections of per-object address slots that code reaches through a base register (ppc64 ``.toc``):
    #: a reference into one means what the slot's relocation points at
    toc_sections: tuple[str, ...] = ()
    #: undefined symbols the module loader resolves by their plain name, so they must stay normal
    #: relocations (ppc64 ``.TOC.``; the ftrace hook, which 6.1's ppc64 loader recognises by name)
    loader_symbols: tuple[str, ...] = ()
    #: relocation types of direct branches, and capstone mnemonics of those that do not return (a tail
    #: call); on ppc64 a tail call into another module or vmlinux would leave the caller with the wrong TOC
    branch_relocs: tuple[int, ...] = ()
    tail_mnemonics: tuple[str, ...] = ()
    #: instruction width when fixed (bytes); 0 for variable-length encodings
    insn_width: int = 0


ARCHES: dict[int, Arch] = {
    C.EM_X86_64: Arch(
        "x86_64", C.EM_X86_64, abs64=1, pc32=2,
        # PC32, PLT32, GOTPCREL, GOTPCRELX, REX_GOTPCRELX: the displacement ends the instruction
        pcrel_bias={2: 4, 4: 4, 9: 4, 41: 4, 42: 4, 24: 8},
        cs_arch="CS_ARCH_X86", cs_mode="CS_MODE_64",
        line_mnemonics=("mov",),
        loader_symbols=("__fentry__",),
    ),
    # ELFv2 (little endian): addends name the target itself; functions may carry a local entry point in
    # st_other; -mprofile-kernel calls _mcount right after the TOC setup (4.x-6.x).
    C.EM_PPC64: Arch(
        "ppc64le", C.EM_PPC64, abs64=38, pc32=26, fentry_names=("_mcount",),
        cs_arch="CS_ARCH_PPC", cs_mode="CS_MODE_64|CS_MODE_LITTLE_ENDIAN",
        line_mnemonics=("li", "lis"),
        toc_sections=(".toc",), loader_symbols=(".TOC.", "_mcount"),
        branch_relocs=(10,), tail_mnemonics=("b",), insn_width=4,  # R_PPC64_REL24
    ),
    # s390x: the PC16DBL/PLT16DBL/PC32DBL/PLT32DBL/GOTPCDBL/GOTENT field sits 2 bytes into its instruction
    # and the displacement counts from the instruction, so the addend is target+2 (``brasl %r14,f`` is f+2).
    C.EM_S390: Arch(
        "s390x", C.EM_S390, abs64=22, pc32=5, pcrel_bias={17: -2, 18: -2, 19: -2, 20: -2, 21: -2, 26: -2},
        fentry_names=("__fentry__", "_mcount"), cs_arch="CS_ARCH_SYSZ", cs_mode="CS_MODE_BIG_ENDIAN",
        line_mnemonics=("lhi", "lghi", "lgfi", "iilf", "llilf", "llill"),
        loader_symbols=("__fentry__", "_mcount"),
    ),
    # aarch64: ftrace entries are patchable-function-entry NOPs (5.5+), older kernels call _mcount.
    C.EM_AARCH64: Arch(
        "aarch64", C.EM_AARCH64, abs64=257, pc32=261, fentry_names=("_mcount",),
        cs_arch="CS_ARCH_ARM64", cs_mode="CS_MODE_ARM",
        line_mnemonics=("mov", "movz", "movn"),
        loader_symbols=("_mcount",), insn_width=4,
    ),
    # loongarch64: patchable-function-entry NOPs (6.x); capstone 5 has no LoongArch decoder, so
    # __LINE__-only changes are not recognised there (they count as changes: safe, not minimal).
    C.EM_LOONGARCH: Arch(
        "loongarch64", C.EM_LOONGARCH, abs64=2, pc32=99, fentry_names=("_mcount",),
        loader_symbols=("_mcount",), insn_width=4,
    ),
}


def arch_for(machine: int) -> Arch:
    """The :class:`Arch` for an ELF ``e_machine`` value; InputError for one klpforge does not support."""
    a = ARCHES.get(machine)
    if a is None:
        raise InputError(f"unsupported architecture (e_machine {machine}); supported: "
                         + ", ".join(x.name for x in ARCHES.values()))
    return a
