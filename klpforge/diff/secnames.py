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

__all__ = ["OBJTOOL_ANNOTATIONS", "GCC_INIT_SECTIONS", "INIT_PREFIXES", "is_init_section", "merge_kind",
           "is_string_section_name", "SPECIAL_SECTIONS", "KEPT_SPECIAL", "AUX_CODE", "is_aux_code",
           "is_special_section"]

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


#: objtool's annotations of instructions in the code they annotate (Linux 6.12 include/linux/objtool.h,
#: instrumentation.h, asm/nospec-branch.h, asm/ibt.h; 7.x folds most into ``.discard.annotate_insn``). Where
#: objtool runs on the linked module (IBT kernels) it reads them there: without them a WARN's ud2 is a dead end
#: (the code after it gets no ORC), an annotated indirect branch or missing ENDBR is a finding. Kept entry by
#: entry with the code they point into (a special table, :data:`SPECIAL_SECTIONS`).
OBJTOOL_ANNOTATIONS = (".discard.reachable", ".discard.unreachable", ".discard.retpoline_safe",
                       ".discard.noendbr", ".discard.instr_begin", ".discard.instr_end",
                       ".discard.intra_function_calls", ".discard.ignore_alts", ".discard.unwind_hints",
                       ".discard.validate_unret", ".discard.func_stack_frame_non_standard",
                       ".discard.ibt_endbr_noseal", ".discard.annotate_insn")

#: Tables rebuilt entry by entry for the included functions (emit/special.py), never compared.
SPECIAL_SECTIONS = ("__bug_table", "__jump_table", ".altinstructions", "__ex_table", ".parainstructions",
                    ".smp_locks", ".static_call_sites", ".retpoline_sites", ".return_sites", ".call_sites",
                    ".kcfi_traps",  # Clang kCFI: the ud2 of each indirect-call check (kernel/cfi.c is_cfi_trap)
                    ".orc_unwind", ".orc_unwind_ip", ".printk_index", "__mcount_loc",
                    "__patchable_function_entries", ".ibt_endbr_seal", "__ftr_fixup", "__mmu_ftr_fixup",
                    "__fw_ftr_fixup", "__lwsync_fixup", "__stf_entry_barrier_fixup",
                    "__stf_exit_barrier_fixup", "__rfi_flush_fixup", "__barrier_nospec_fixup",
                    "__spec_barrier_fixup", "__uaccess_flush_fixup", "__entry_flush_fixup",
                    "__scv_entry_flush_fixup", ".s390_indirect_jump", ".s390_indirect_call",
                    ".s390_return_reg", ".s390_return_mem", ".s390_indirect_branches",
                    # Xen 4.17 (xen/arch/x86/include/asm/bug.h, asm_defns.h): per-site tables too
                    ".bug_frames.", ".ex_table", *OBJTOOL_ANNOTATIONS, "__tracepoints_ptrs",
                    "__tracepoints", "__tracepoints_strings", "_ftrace_events", "__bpf_raw_tp_map",
                    "__syscalls_metadata", "_error_injection_whitelist", "__param", "__dyndbg",
                    "__verbose", ".kpatch.callbacks.", ".initcall", ".init.setup", ".con_initcall")
#: Tables whose entries point into included code are kept (emit/special.py); the rest only hold
#: registrations (initcalls, tracepoint definitions) that a patch must not redo.
KEPT_SPECIAL = SPECIAL_SECTIONS[:SPECIAL_SECTIONS.index("__tracepoints_ptrs")]
#: Code reached only through a special-section entry; copied whole when one of its entries is kept.
#: (ppc64 ``__ftr_alt_<label>`` holds the alternative instructions of ``__*ftr_fixup`` entries.)
AUX_CODE = (".altinstr_replacement", ".fixup", ".altinstr_aux", "__ftr_alt_")


def is_aux_code(name: str) -> bool:
    """True for a section of code reached only through special-section entries (:data:`AUX_CODE`)."""
    return name in AUX_CODE or name.startswith("__ftr_alt_")


def is_special_section(name: str) -> bool:
    """True for a special section (:data:`SPECIAL_SECTIONS`) or auxiliary code: rebuilt per entry, never compared."""
    return name.startswith(SPECIAL_SECTIONS) or is_aux_code(name)
