"""Symbols a patch adds: new globals (bound inside the live patch) and new exports (re-exported by it).

A diff runs one object at a time, so a global that one object of the patch adds and another one calls is,
for the caller's diff, an undefined symbol like any kernel symbol; :func:`patch_globals` names those so
the module builder binds them to the module's own definition (``klpforge.diff.emit.postlink.apply_klp``).

``EXPORT_SYMBOL(x)`` (Linux 6.1 ``include/linux/export.h``) puts a ``struct kernel_symbol`` in section
``___ksymtab+x`` (``___ksymtab_gpl+x`` for the GPL form; ``__ksymtab_x`` labels it) and the name and
namespace strings (``__kstrtab_x``, ``__kstrtabns_x``) in ``__ksymtab_strings``. The diff drops these
tables (they belong to the running kernel); :func:`patch_exports` finds the ones the patch *adds*, so the
generated module core exports them again (``scripts/module.lds.S`` gathers ``___ksymtab+*`` into the
module's ``__ksymtab``) and other modules can link against the new function.

>>> patch_globals({"a.o": Path("orig/a.o")}, {"a.o": Path("patched/a.o")})   # doctest: +SKIP
{'klpforge_new_helper'}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..elf import ElfFile
from ..elf import constants as C
from ..util.errors import UnsafeChange
from .module import ModuleExport

__all__ = ["defined_globals", "patch_globals", "exports_of", "patch_exports"]

_KSYMTAB = ("___ksymtab+", "___ksymtab_gpl+")


def defined_globals(path: Path) -> set[str]:
    """Names of the global and weak symbols ``path`` defines (a relocatable object)."""
    elf = ElfFile.open(path)
    if not len(elf.syms):
        return set()
    bind = elf.sym_bind
    ok = (elf.syms["shndx"] != C.SHN_UNDEF) & ((bind == C.STB_GLOBAL) | (bind == C.STB_WEAK))
    ok[0] = False
    ok &= ~elf.sym_special | (elf.syms["shndx"] == C.SHN_ABS)
    return {elf.sym_names[i] for i in ok.nonzero()[0].tolist() if elf.sym_names[i]}


def patch_globals(orig: Mapping[str, Path], patched: Mapping[str, Path]) -> set[str]:
    """Globals some patched object defines that its original did not (``obj -> object file`` maps)."""
    out: set[str] = set()
    for obj, p in patched.items():
        out |= defined_globals(p) - (defined_globals(orig[obj]) if obj in orig else set())
    return out


def exports_of(path: Path) -> dict[str, tuple[bool, str, bool]]:
    """``name -> (gpl, namespace, is a function)`` for every ``EXPORT_SYMBOL*`` in the object ``path``."""
    elf = ElfFile.open(path)
    out: dict[str, tuple[bool, str, bool]] = {}
    strings = elf.find_section("__ksymtab_strings")
    sdata = elf.section_bytes(strings) if strings is not None else b""
    at = {elf.sym_names[i]: int(elf.syms["value"][i]) for i in range(1, len(elf.syms))
          if strings is not None and int(elf.syms["shndx"][i]) == strings and not elf.sym_special[i]}
    funcs = {elf.sym_names[i] for i in (elf.sym_type == C.STT_FUNC).nonzero()[0].tolist()}
    for name in elf.section_names:
        for prefix in _KSYMTAB:
            if name.startswith(prefix):
                sym = name[len(prefix):]
                ns = ""
                off = at.get(f"__kstrtabns_{sym}")
                if off is not None:
                    ns = sdata[off:sdata.index(b"\0", off)].decode(errors="replace")
                out[sym] = (prefix == "___ksymtab_gpl+", ns, sym in funcs)
    return out


def patch_exports(orig: Mapping[str, Path], patched: Mapping[str, Path]) -> list[ModuleExport]:
    """Exports the patch adds, in object order; each must name a symbol the patch adds too.

    Raises :class:`UnsafeChange` for a new export of a symbol the running kernel already has: the live
    patch module cannot export the kernel's own symbol (its copy, if any, is reached only through
    ``klp_func``), and exporting a second symbol of that name would shadow nothing and mislead.
    """
    new = patch_globals(orig, patched)
    out: list[ModuleExport] = []
    refused: list[str] = []
    for obj, p in patched.items():
        before = exports_of(orig[obj]) if obj in orig else {}
        for name, (gpl, ns, func) in exports_of(p).items():
            if name in before:
                continue
            if name not in new:
                refused.append(f"{obj}: the patch exports {name}, which the running kernel already has: "
                               f"a live patch can export only functions and data it adds "
                               f"(export a new wrapper instead)")
                continue
            out.append(ModuleExport(name, gpl, ns, func))
    if refused:
        raise UnsafeChange(refused)
    return out
