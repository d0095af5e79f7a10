"""New globals and new exports of a patch (issue 12 items 4 and 11), on objects gcc compiles now.

The export tables are written as Linux 6.1 ``include/linux/export.h`` writes them with
``CONFIG_HAVE_ARCH_PREL32_RELOCATIONS`` (x86_64): a ``___ksymtab[_gpl]+sym`` section of three PREL32
words and the name/namespace strings in ``__ksymtab_strings``.
"""

from __future__ import annotations

import pytest

from klpforge.kbuild.module import ModuleExport, module_source
from klpforge.kbuild.newsyms import exports_of, patch_exports, patch_globals
from klpforge.util.errors import UnsafeChange

EXPORT = r"""
#define EXPORT(sym, sec, ns) \
  asm("\t.section \"__ksymtab_strings\",\"aMS\",%%progbits,1\n" \
      "__kstrtab_" #sym ":\n\t.asciz \"" #sym "\"\n" \
      "__kstrtabns_" #sym ":\n\t.asciz \"" ns "\"\n\t.previous\n"); \
  asm("\t.section \"___ksymtab" sec "+" #sym "\", \"a\"\n\t.balign 4\n" \
      "__ksymtab_" #sym ":\n\t.long " #sym " - .\n\t.long __kstrtab_" #sym " - .\n" \
      "\t.long __kstrtabns_" #sym " - .\n\t.previous\n")
int old_export(int x) { return x + 1; }
EXPORT(old_export, "", "");
int old_plain(int x) { return x + 2; }
%s
"""


def test_new_exports_and_globals_are_found(cc) -> None:
    orig = cc(EXPORT % "", "orig")
    patched = cc(EXPORT % """
int new_fn(int x) { return x * 6; }
EXPORT(new_fn, "_gpl", "");
int new_data = 5;
EXPORT(new_data, "", "KLPF_NS");
""", "patched")
    assert exports_of(patched) == {"old_export": (False, "", True), "new_fn": (True, "", True),
                                   "new_data": (False, "KLPF_NS", False)}
    assert patch_globals({"a.o": orig}, {"a.o": patched}) == {"new_fn", "new_data"}
    got = patch_exports({"a.o": orig}, {"a.o": patched})
    assert got == [ModuleExport("new_fn", True, "", True), ModuleExport("new_data", False, "KLPF_NS", False)]
    src = module_source("livepatch_x", [], True, got)
    assert "extern void new_fn(void);\nEXPORT_SYMBOL_GPL(new_fn);" in src
    assert "extern char new_data[];\nEXPORT_SYMBOL_NS(new_data, KLPF_NS);" in src


def test_exporting_a_symbol_the_kernel_has_is_refused(cc) -> None:
    orig = cc(EXPORT % "", "orig")
    patched = cc(EXPORT % 'EXPORT(old_plain, "_gpl", "");', "patched")
    with pytest.raises(UnsafeChange, match="a.o: the patch exports old_plain, which the running kernel "
                                           "already has: a live patch can export only functions and data "
                                           "it adds"):
        patch_exports({"a.o": orig}, {"a.o": patched})
