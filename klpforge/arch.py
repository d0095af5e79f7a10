"""What klpforge needs to know about each architecture: relocation types, function entries, decoding.

>>> arch_for(62).name
'x86_64'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .elf import constants as C
from .errors import InputError

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
    #: registers that carry the 2nd/3rd call argument (where WARN/printk-style helpers get __LINE__)
    line_regs: tuple[str, ...] = ()


ARCHES: dict[int, Arch] = {
    C.EM_X86_64: Arch(
        "x86_64", C.EM_X86_64, abs64=1, pc32=2,
        # PC32, PLT32, GOTPCREL, GOTPCRELX, REX_GOTPCRELX: the displacement ends the instruction
        pcrel_bias={2: 4, 4: 4, 9: 4, 41: 4, 42: 4, 24: 8},
        cs_arch="CS_ARCH_X86", cs_mode="CS_MODE_64",
        line_regs=("esi", "edx", "rsi", "rdx", "si", "dx"),
    ),
    C.EM_PPC64: Arch("ppc64le", C.EM_PPC64, abs64=38, pc32=26, fentry_names=("_mcount",),
                     cs_arch="CS_ARCH_PPC", cs_mode="CS_MODE_64", line_regs=("r4", "r5")),
    C.EM_S390: Arch("s390x", C.EM_S390, abs64=22, pc32=5, pcrel_bias={19: 2, 20: 2, 26: 2, 5: 0},
                    fentry_names=("__fentry__",), cs_arch="CS_ARCH_SYSZ", cs_mode="CS_MODE_BIG_ENDIAN",
                    line_regs=("r3", "r4", "%r3", "%r4")),
    C.EM_AARCH64: Arch("aarch64", C.EM_AARCH64, abs64=257, pc32=261, fentry_names=(),
                       cs_arch="CS_ARCH_ARM64", cs_mode="CS_MODE_ARM", line_regs=("w1", "w2", "x1", "x2")),
    C.EM_LOONGARCH: Arch("loongarch64", C.EM_LOONGARCH, abs64=2, pc32=99, fentry_names=(),
                         line_regs=("a1", "a2")),
}


def arch_for(machine: int) -> Arch:
    """The :class:`Arch` for an ELF ``e_machine`` value; InputError for one klpforge does not support."""
    a = ARCHES.get(machine)
    if a is None:
        raise InputError(f"unsupported architecture (e_machine {machine}); supported: "
                         + ", ".join(x.name for x in ARCHES.values()))
    return a
