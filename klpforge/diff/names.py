"""What GCC and the kernel do to symbol and section names, and how klpforge undoes it.

GCC numbers the clones and static locals it creates per translation unit (``foo.isra.0``,
``foo.constprop.3``, ``x.12``, ``CSWTCH.123``); the kernel numbers ``__UNIQUE_ID_*`` names with
``__COUNTER__``. A patch can shift every number, so correlation works on *canonical* names, with the
numbers removed.

>>> canonical("copy_process.isra.6.part.7")
'copy_process.isra.part'
>>> canonical("__UNIQUE_ID_ddebug123")
'__UNIQUE_ID_ddebug'
>>> base_function("sync_request_write.cold")
'sync_request_write'
"""

from __future__ import annotations

import re
from functools import lru_cache

from .secnames import is_string_section_name, merge_kind

__all__ = [
    "canonical", "base_function", "is_cold", "clone_parent", "is_special_static", "is_local_label",
    "section_subject", "is_string_section", "CLONE_KINDS", "special_kind",
]

CLONE_KINDS = ("isra", "constprop", "part", "cold", "lto_priv", "localalias", "llvm")

_NUM = re.compile(r"\.\d+(?=\.|$)")
_UNIQUE = re.compile(r"^(__UNIQUE_ID_.*?)\d+$")
# BTF_ID() (include/linux/btf_ids.h, 6.1) names its slot __BTF_ID__<kind>__<name>__<__COUNTER__>
_BTF_ID = re.compile(r"^(__BTF_ID__\w+__)\d+$")
_LLVM = re.compile(r"\.llvm\.\d+$")


@lru_cache(maxsize=1 << 18)
def canonical(name: str) -> str:
    """``name`` with GCC's and the kernel's numbering removed."""
    n = _LLVM.sub("", name)
    n = _NUM.sub("", n)
    return _BTF_ID.sub(r"\1", _UNIQUE.sub(r"\1", n))


def is_cold(name: str) -> bool:
    """True for the cold part GCC split out of a function (``foo.cold``, ``foo.cold.3``)."""
    return canonical(name).endswith(".cold")


def clone_parent(name: str) -> str | None:
    """The function a ``.cold`` part belongs to (``foo.isra.0.cold.1`` → ``foo.isra.0``), else None."""
    m = re.match(r"^(.*)\.cold(\.\d+)?$", name)
    return m.group(1) if m else None


def base_function(name: str) -> str:
    """The source-level function a GCC-made symbol comes from (``foo.part.0.isra.1`` → ``foo``)."""
    return canonical(name).split(".", 1)[0] if not name.startswith(".") else name


# Statics GCC or kernel macros create per use site; two builds' copies are unrelated objects, so they
# are never correlated and a patch that needs one gets its own fresh copy (kernel 6.1 macros: lockdep
# ``__key``, WARN_ONCE ``__warned``/``__already_done``, printk_ratelimited ``_rs``, dynamic debug
# descriptors, ``__func__`` strings; GCC switch tables ``CSWTCH``).
_SPECIAL_PREFIXES = ("__key.", "__warned.", "__already_done.", "__func__.", "_rs.", "CSWTCH.",
                     "__print_once.", "descriptor.", "_entry.", "_entry_ptr.", "__UNIQUE_ID_ddebug",
                     "__msg.", "__tpstrtab_", ".data..L__unnamed_", "__kstrtab_", "__kstrtabns_",
                     "__ksymtab_", ".Lubsan_", ".data..Lubsan_")
_SPECIAL_EXACT = {"__key", "__warned", "__already_done", "__func__", "_rs", "CSWTCH", "descriptor",
                  "__print_once"}


@lru_cache(maxsize=1 << 18)  # the original and the patched object share most names
def is_special_static(name: str) -> bool:
    """True for per-use-site statics that must never be correlated (see the comment above; also UBSAN's
    per-check source-location and type records, ``.Lubsan_data12`` or a ``.data..Lubsan_*`` section,
    whose line numbers move with any edit above them)."""
    return name in _SPECIAL_EXACT or name.startswith(_SPECIAL_PREFIXES)


def special_kind(name: str) -> str:
    """What a special static is, without any numbering: two use sites' copies compare by kind.

    >>> special_kind(".Lubsan_data167"), special_kind("__key.12")
    ('.Lubsan_data', '__key')
    """
    return canonical(name).rstrip("0123456789")


#: ELF mapping symbols (aarch64/arm ``$x``/``$d``, with an optional ``.N``): they mark code and data inside a
#: section for disassemblers and say nothing about what the code is.
_MAPPING = re.compile(r"^\$[adtx](\..*)?$")


def is_local_label(name: str) -> bool:
    """Assembler-local labels (``.LC0``, ``.L__unnamed_1``, loongarch's ``L0^A`` temporaries) and mapping
    symbols (``$x``, ``$d``): never correlated by name (labels are compared by content).

    >>> is_local_label("$x"), is_local_label("$d.12"), is_local_label("$xyz")
    (True, True, False)
    """
    return name.startswith((".L", "L0\x01")) or _MAPPING.match(name) is not None


_SUBJECT = re.compile(
    r"^\.(?:text\.unlikely|text\.hot|text\.startup|text\.exit|text|init\.text|exit\.text|data\.rel\.ro\.local|"
    r"data\.rel\.ro|data\.rel\.local|data\.rel|data\.once|data|bss|rodata|sdata|sbss|srodata|init\.data|"
    r"init\.rodata|ref\.data|tbss|tdata)\.(.+)$")


@lru_cache(maxsize=1 << 18)
def section_subject(secname: str) -> str | None:
    """The symbol a ``-ffunction-sections``/``-fdata-sections`` section is named after, if any.

    >>> section_subject(".text.unlikely.meminfo_proc_show")
    'meminfo_proc_show'
    """
    m = _SUBJECT.match(secname)
    if not m:
        return None
    if merge_kind(secname):  # .rodata.cst8, .rodata.str1.1: merge sections, named after nothing
        return None
    return m.group(1)


def is_string_section(secname: str, flags: int) -> bool:
    """Sections of NUL-terminated string literals (merged by the linker): compared by content."""
    return bool(flags & 0x20) or is_string_section_name(secname)
