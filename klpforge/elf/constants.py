"""ELF constants used by klpforge (values from the System V gABI and ``include/uapi/linux/elf.h``)."""

from __future__ import annotations

__all__ = [
    "ET_REL", "ET_EXEC", "ET_DYN",
    "EM_386", "EM_PPC64", "EM_S390", "EM_ARM", "EM_X86_64", "EM_AARCH64", "EM_LOONGARCH", "MACHINE_NAMES",
    "SHT_NULL", "SHT_PROGBITS", "SHT_SYMTAB", "SHT_STRTAB", "SHT_RELA", "SHT_NOBITS", "SHT_REL", "SHT_GROUP",
    "SHT_SYMTAB_SHNDX", "SHT_NOTE", "SHT_INIT_ARRAY", "SHT_FINI_ARRAY",
    "SHF_WRITE", "SHF_ALLOC", "SHF_EXECINSTR", "SHF_MERGE", "SHF_STRINGS", "SHF_INFO_LINK", "SHF_GROUP",
    "SHF_RELA_LIVEPATCH",
    "SHN_UNDEF", "SHN_LORESERVE", "SHN_ABS", "SHN_COMMON", "SHN_XINDEX", "SHN_LIVEPATCH",
    "STB_LOCAL", "STB_GLOBAL", "STB_WEAK",
    "STT_NOTYPE", "STT_OBJECT", "STT_FUNC", "STT_SECTION", "STT_FILE", "STT_COMMON", "STT_TLS",
    "GRP_COMDAT",
]

ET_REL, ET_EXEC, ET_DYN = 1, 2, 3

EM_386 = 3
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_LOONGARCH = 258

#: ``e_machine`` → the architecture name klpforge uses (the kernel's ``uname -m`` spelling).
MACHINE_NAMES = {
    EM_386: "i386", EM_PPC64: "ppc64le", EM_S390: "s390x", EM_ARM: "arm",
    EM_X86_64: "x86_64", EM_AARCH64: "aarch64", EM_LOONGARCH: "loongarch64",
}

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOTE, SHT_NOBITS, SHT_REL = 7, 8, 9
SHT_INIT_ARRAY, SHT_FINI_ARRAY = 14, 15
SHT_GROUP, SHT_SYMTAB_SHNDX = 17, 18

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_MERGE = 0x10
SHF_STRINGS = 0x20
SHF_INFO_LINK = 0x40
SHF_GROUP = 0x200
#: Marks a ``.klp.rela.*`` section (kernel ``include/uapi/linux/elf.h``, since 4.7).
SHF_RELA_LIVEPATCH = 0x00100000

SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
#: Marks a ``.klp.sym.*`` symbol (kernel ``include/uapi/linux/elf.h``, since 4.7).
SHN_LIVEPATCH = 0xFF20
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
SHN_XINDEX = 0xFFFF

STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE, STT_COMMON, STT_TLS = 0, 1, 2, 3, 4, 5, 6

GRP_COMDAT = 1
