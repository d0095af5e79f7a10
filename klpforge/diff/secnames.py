"""What a section's *name* says, matched exactly: never a bare prefix a function's own section can share.

With ``-ffunction-sections`` a function ``exit_signals`` lives in ``.text.exit_signals`` and ``startup_64``
in ``.text.startup_64``; only ``.text.exit``/``.text.startup`` themselves (and GCC's per-function
``.text.exit.NAME``/``.text.startup.NAME``) are GCC's exit/startup sections. Likewise ``.rodata.cstate``
is the data object ``cstate``, not a ``.rodata.cst8`` merge section.

>>> is_init_section(".text.exit_signals"), is_init_section(".text.exit"), is_init_section(".init.text")
(False, True, True)
>>> merge_kind(".rodata.cst16"), merge_kind(".rodata.str1.8"), merge_kind(".rodata.cstate")
('cst', 'str', '')
"""

from __future__ import annotations

import re

__all__ = ["GCC_INIT_SECTIONS", "INIT_PREFIXES", "is_init_section", "merge_kind", "is_string_section_name"]

#: GCC's own sections for code run only at program start/exit (``-freorder-functions``); a name equal to
#: one of these, or one of these plus ``.SUFFIX`` (GCC with -ffunction-sections), is init/exit code.
GCC_INIT_SECTIONS = (".text.startup", ".text.exit")
#: Kernel init/exit sections (6.1 ``include/linux/init.h``, ``include/asm-generic/vmlinux.lds.h``): each
#: prefix ends in a dot, so no ``.text.NAME``/``.data.NAME`` section of a function or object matches.
INIT_PREFIXES = (".init.", ".exit.", ".meminit.", ".memexit.", ".cpuinit.", ".cpuexit.")

_MERGE = re.compile(r"^\.(?:rodata|srodata|data\.rel\.ro)(?:\..+)?\.(?:(cst)\d+|(str)\d+\.\d+)$")


def is_init_section(name: str) -> bool:
    """Is ``name`` a section of code/data freed after boot or module init (or run only at exit)?"""
    if name.startswith(INIT_PREFIXES):
        return True
    return any(name == s or name.startswith(s + ".") for s in GCC_INIT_SECTIONS)


def merge_kind(name: str) -> str:
    """'cst' for a constant-merge section (``.rodata.cst8``, ``.rodata.foo.cst16``), 'str' for a string
    section (``.rodata.str1.1``, ``.rodata.bar.str1.8``), '' for anything else (by name only; the
    ``SHF_MERGE``/``SHF_STRINGS`` flags decide when present)."""
    m = _MERGE.match(name)
    if not m:
        return ""
    return "cst" if m.group(1) else "str"


def is_string_section_name(name: str) -> bool:
    """Does the name alone say GCC's string-literal section (``.rodata.str1.1``)?"""
    return merge_kind(name) == "str"
