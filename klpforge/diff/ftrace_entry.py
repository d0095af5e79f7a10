"""Which functions ftrace can redirect: the ones with an ftrace entry, resolved by *address*.

An entry is a record in ``__mcount_loc``/``__patchable_function_entries`` or a call to the fentry/mcount
hook in a function's first instructions. Records point at a place, often through a section symbol or a
local label (loongarch64 ``SYSCALL_DEFINE``: the record names a label at ``__se_sys_X``, and ``sys_X`` is a
global alias at the same address); every function symbol starting at that place has the entry, since
ftrace patches the body, not a name. The check belongs to the *original* object: the kernel redirects
the running (original) function to the new copy, so the patched copy's own entry does not matter
(kernel 6.1 ``kernel/livepatch/patch.c`` ``klp_patch_func`` registers an ftrace_ops on the old address).

>>> with_entry(orig, arch_for(62), {orig.sym_names.index("spin_forever")})
{12}
"""

from __future__ import annotations

import numpy as np

from ..elf import constants as C
from ..util.arrays import isin
from .arch import Arch
from .model import Object

__all__ = ["with_entry", "ENTRY_SECTIONS", "HOOK_WINDOW", "PADDING_WINDOW"]

#: Sections whose records mark ftrace entries (x86 ``-mrecord-mcount``; ``-fpatchable-function-entry``).
ENTRY_SECTIONS = ("__mcount_loc", "__patchable_function_entries")
#: How far into a function its hook call may sit (bytes): ppc64 ``-mprofile-kernel`` sets up the TOC first.
HOOK_WINDOW = 32
#: How far before a function its patchable NOPs may start (bytes): aarch64 ``-fpatchable-function-entry=4,2``
#: (6.1 CALL_OPS/BTI), x86 call padding (``=16,16``).
PADDING_WINDOW = 16


def with_entry(obj: Object, arch: Arch, only: set[int]) -> set[int]:
    """The functions of ``only`` (symbol indices of ``obj``) that have an ftrace entry.

    Asked only for the functions being replaced: a whole-object scan would cost O(object)."""
    out: set[int] = set()
    if not only:
        return out
    by_addr: dict[tuple[int, int], list[int]] = {}
    for f in only:
        by_addr.setdefault((int(obj.shndx[f]), int(obj.value[f])), []).append(f)
    want_secs = np.array(sorted({s for s, _ in by_addr}), dtype=np.int64)
    for sec in range(1, obj.nsec):
        if obj.sec_names[sec] not in ENTRY_SECTIONS:
            continue
        r = obj.relocs(sec)
        r = r[isin(obj.shndx[r["sym"].astype(np.int64)], want_secs)]
        for s, a in zip(r["sym"].tolist(), r["addend"].tolist(), strict=True):
            tsec = int(obj.shndx[s])
            start = _function_start(obj, tsec, int(obj.value[s]) + a)
            out.update(by_addr.get((tsec, start), ()))
    hooks = [i for i, n in enumerate(obj.sym_names) if n in arch.fentry_names and not obj.defined[i]]
    if hooks:
        for sec in want_secs.tolist():
            if not obj.is_text(sec):
                continue
            r = obj.relocs(sec)
            offs = r["offset"][isin(r["sym"], hooks)].astype(np.int64)
            for (s, lo), funcs in by_addr.items():
                if s == sec and ((offs >= lo) & (offs < lo + HOOK_WINDOW)).any():
                    out.update(funcs)
    return out


def _function_start(obj: Object, sec: int, where: int) -> int:
    """Start of the function an entry record at ``sec+where`` belongs to: the one covering it, else the
    nearest one starting at most :data:`PADDING_WINDOW` bytes after it (NOPs before the entry point);
    -1 if none. Binary search over the section's sorted symbols (a vmlinux.o ``.text`` holds thousands)."""
    if sec <= 0 or sec >= obj.nsec:
        return -1
    starts, ends, syms, _prev = obj.sorted_members(sec)
    isfunc = obj.stype[syms] == C.STT_FUNC
    k = int(np.searchsorted(starts, where, side="right"))
    lo = max(0, k - 64)
    cover = [int(starts[j]) for j in range(lo, k) if isfunc[j] and ends[j] > where]
    if cover:
        return max(cover)  # nested symbols: the innermost start (aliases share it)
    for j in range(k, len(starts)):
        if int(starts[j]) > where + PADDING_WINDOW:
            break
        if isfunc[j]:
            return int(starts[j])
    return -1
