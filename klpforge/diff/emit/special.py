"""Special sections: kernel tables with one entry per site, cut down to the entries of included code.

Entry sizes come from the environment (``JUMP_STRUCT_SIZE=16`` ..., the names kpatch uses), from
options, from ``sh_entsize``, or from the defaults below (Linux 6.1, x86_64 unless noted).

>>> entry_size("__jump_table", {"JUMP_STRUCT_SIZE": "16"}, 0, 8)
16
"""

from __future__ import annotations

from collections.abc import Mapping

from ...util.errors import InputError

__all__ = ["ENV_NAMES", "DEFAULT_SIZES", "POINTER_SIZED", "entry_size", "PAIRED"]

#: Environment variable naming each table's entry size.
ENV_NAMES = {
    "__bug_table": "BUG_STRUCT_SIZE", "__jump_table": "JUMP_STRUCT_SIZE", ".altinstructions": "ALT_STRUCT_SIZE",
    "__ex_table": "EX_STRUCT_SIZE", ".parainstructions": "PARA_STRUCT_SIZE", ".orc_unwind": "ORC_STRUCT_SIZE",
    ".static_call_sites": "STATIC_CALL_STRUCT_SIZE", ".printk_index": "PRINTK_INDEX_STRUCT_SIZE",
    "__ftr_fixup": "FIXUP_STRUCT_SIZE", "__mmu_ftr_fixup": "FIXUP_STRUCT_SIZE",
    "__fw_ftr_fixup": "FIXUP_STRUCT_SIZE", "__lwsync_fixup": "LWSYNC_STRUCT_SIZE",
}

#: Defaults for Linux 6.1 x86_64 (``arch/x86/include/asm/*.h``); fixed-size tables on every kernel.
DEFAULT_SIZES = {
    "__bug_table": 12, "__jump_table": 16, ".altinstructions": 12, "__ex_table": 12, ".parainstructions": 16,
    ".orc_unwind": 6, ".orc_unwind_ip": 4, ".static_call_sites": 8, ".smp_locks": 4, ".retpoline_sites": 4,
    ".return_sites": 4, ".call_sites": 4, ".ibt_endbr_seal": 4, ".printk_index": 48, ".kcfi_traps": 4,
    ".s390_indirect_jump": 4, ".s390_indirect_call": 4, ".s390_return_reg": 4, ".s390_return_mem": 4,
    ".s390_indirect_branches": 4, "__ftr_fixup": 48, "__mmu_ftr_fixup": 48, "__fw_ftr_fixup": 48,
    # Xen 4.17 x86: struct bug_frame is two 32-bit words; an assert frame is followed by a second one
    # holding the message (asm/bug.h); struct exception_table_entry is two s32 (asm/uaccess.h)
    ".bug_frames.0": 8, ".bug_frames.1": 8, ".bug_frames.2": 8, ".bug_frames.3": 16, ".ex_table": 8,
    ".ex_table.pre": 8,
    # objtool's annotations (Linux 6.12/7.3 include/linux/objtool.h): ``.long label`` or ``.long label - .``;
    # struct unwind_hint is 12 bytes; the C STACK_FRAME_NON_STANDARD and IBT_NOSEAL are pointers; 7.x
    # ``.discard.annotate_insn`` is ``.long label - .; .long type``
    ".discard.reachable": 4, ".discard.unreachable": 4, ".discard.retpoline_safe": 4, ".discard.noendbr": 4,
    ".discard.instr_begin": 4, ".discard.instr_end": 4, ".discard.intra_function_calls": 4,
    ".discard.ignore_alts": 4, ".discard.validate_unret": 4, ".discard.unwind_hints": 12,
    ".discard.func_stack_frame_non_standard": 8, ".discard.ibt_endbr_noseal": 8, ".discard.annotate_insn": 8,
}

#: ppc64 tables of one ``FTR_ENTRY_OFFSET`` each, which is ``.8byte`` on 64-bit kernels
#: (``arch/powerpc/include/asm/feature-fixups.h``, 4.x-6.x): one pointer-sized entry.
POINTER_SIZED = ("__lwsync_fixup", "__stf_entry_barrier_fixup", "__stf_exit_barrier_fixup",
                 "__rfi_flush_fixup", "__barrier_nospec_fixup", "__spec_barrier_fixup",
                 "__uaccess_flush_fixup", "__entry_flush_fixup", "__scv_entry_flush_fixup")

#: Tables kept in step with another one, entry i with entry i (``.orc_unwind`` has no relocations).
PAIRED = {".orc_unwind": ".orc_unwind_ip"}


def entry_size(name: str, env: Mapping[str, str], sh_entsize: int, pointer_size: int) -> int:
    """Entry size of special section ``name`` (see the module docstring)."""
    if name in ("__mcount_loc", "__patchable_function_entries"):
        return pointer_size
    if name in POINTER_SIZED and not (ENV_NAMES.get(name) and env.get(ENV_NAMES[name])):
        return pointer_size
    var = ENV_NAMES.get(name)
    if var and env.get(var):
        try:
            v = int(env[var], 0)
        except ValueError:
            raise InputError(f"{var}={env[var]!r} is not a number") from None
        if v <= 0:
            raise InputError(f"{var}={v} must be positive")
        return v
    if sh_entsize:
        return sh_entsize
    if name in DEFAULT_SIZES:
        return DEFAULT_SIZES[name]
    raise InputError(f"cannot tell the entry size of {name}: set {var or 'the entry size'} "
                     f"(e.g. {var or 'X_STRUCT_SIZE'}=16) or pass --entsize {name}=N")
