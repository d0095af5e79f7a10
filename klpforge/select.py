"""The *select* stage: what goes into the live patch, why, and what must be refused.

Start from the changed functions (a changed ``.cold`` part makes its parent changed), add every
function's ``.cold`` part (its jumps land back in the new parent), then follow relocations: new
functions and data, fresh copies of special statics, string literals and anonymous tables are pulled in;
everything that exists unchanged in the running kernel stays a reference. Refusals are collected, not
raised one at a time, so the user sees every problem at once.

>>> sel = select(corr, cmp, arch_for(62))
>>> sel.reasons[sel.patched[0]]
'changed: code differs'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .arch import Arch
from .compare import CHANGED, NEW, Comparison
from .correlate import Correlation
from .elf import constants as C
from .elf.file import cstring_at
from .ftrace_entry import with_entry
from .icf import split_folded
from .model import OBJTOOL_ANNOTATIONS, Object, is_ignored_section
from .names import canonical, clone_parent, is_special_static
from .secnames import is_init_section
from .sharedsec import gap, is_shared, place_of, resolved_refs
from .statics import users_of

__all__ = ["Selection", "select", "SPECIAL_SECTIONS", "AUX_CODE", "is_aux_code"]

#: Tables rebuilt entry by entry for the included functions (emit/special.py), never compared.
SPECIAL_SECTIONS = ("__bug_table", "__jump_table", ".altinstructions", "__ex_table", ".parainstructions",
                    ".smp_locks", ".static_call_sites", ".retpoline_sites", ".return_sites", ".call_sites",
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
    return name.startswith(SPECIAL_SECTIONS) or is_aux_code(name)


@dataclass
class Selection:
    """Patched-object symbols and sections that go into the live patch."""

    included: dict[int, str] = field(default_factory=dict)  # patched symbol -> why it is in
    sections: dict[int, str] = field(default_factory=dict)  # patched section -> why it is in
    patched: list[int] = field(default_factory=list)  # functions replaced in the running kernel
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: set[int] = field(default_factory=set)  # KPATCH_IGNORE_FUNCTION
    callbacks: dict[str, int] = field(default_factory=dict)  # pre_patch/... -> patched function symbol
    has_fentry: set[int] = field(default_factory=set)  # replaced functions whose original has an entry
    #: TOC sections (ppc64 ``.toc``) -> offsets of the slots included code uses; only those keep relocations
    toc_slots: dict[int, set[int]] = field(default_factory=dict)


def _is_init(name: str) -> bool:
    return is_init_section(name)


def _pointed_strings(obj: Object, secname: str) -> set[str]:
    """The strings a table of ``char *`` (one relocation each) points at."""
    out: set[str] = set()
    s = obj.find_section(secname)
    if s is not None:
        for x in obj.relocs(s):
            tsec = int(obj.shndx[int(x["sym"])])
            out.add(cstring_at(obj.section_data(tsec), int(x["addend"]) + int(obj.value[int(x["sym"])])))
    return out


def _pointed_functions(obj: Object, arch: Arch, secname: str) -> set[int]:
    """The functions a table of function pointers points at."""
    s = obj.find_section(secname)
    if s is None:
        return set()
    r = obj.relocs(s)
    return {resolve_target(obj, arch, int(x["sym"]), int(x["type"]), int(x["addend"]))[0] for x in r}


def _ignore_lists(obj: Object) -> tuple[set[int], set[str]]:
    """``KPATCH_IGNORE_FUNCTION`` symbols and ``KPATCH_IGNORE_SECTION`` names (kpatch-macros.h)."""
    funcs: set[int] = set()
    f = obj.find_section(".kpatch.ignore.functions")
    if f is not None:
        funcs = {int(s) for s in obj.relocs(f)["sym"]}
    return funcs, _pointed_strings(obj, ".kpatch.ignore.sections")


def resolve_target(obj: Object, arch: Arch, sym: int, rtype: int, addend: int,
                   site: tuple[int, int] | None = None) -> tuple[int, int]:
    """For a section-symbol reference, the covering named symbol and the addend relative to it;
    other references come back unchanged. Returns ``(symbol, addend)``; symbol is the section
    symbol when nothing covers the place. ``site`` (section, offset) of the relocation lets an x86-64
    ``%rip``-relative reference into a section shared by several symbols count the immediate that
    follows its field (``addl $1, x(%rip)``: klpforge/pcrel.py)."""
    if obj.stype[sym] != C.STT_SECTION:
        return sym, addend
    sec = int(obj.shndx[sym])
    where = addend + arch.pcrel_bias.get(rtype, 0)
    if site is not None and len(obj.syms_in_section.get(sec, ())) > 1:
        where = place_of(obj, arch, rtype, addend, site)
    t = obj.symbol_at(sec, where)
    if t >= 0 and obj.stype[t] in (C.STT_FUNC, C.STT_OBJECT):
        return t, addend - int(obj.value[t])
    return sym, addend


def select(corr: Correlation, cmp: Comparison, arch: Arch, require_ftrace: bool = True) -> Selection:
    """Decide the contents of the live patch (see the module docstring). ``require_ftrace=False`` for
    targets that redirect a function by overwriting its first instruction (Xen), not through ftrace."""
    o, p = corr.orig, corr.patched
    sel = Selection()
    ign_funcs, ign_secs = _ignore_lists(p)
    sel.ignored = ign_funcs
    status = cmp.status

    changed = {i for i, s in status.items() if s == CHANGED and i not in ign_funcs}
    # KPATCH_FORCE_UNSAFE(fn): replace fn even though it compiled the same
    forced = {f for f in _pointed_functions(p, arch, ".kpatch.force") if p.stype[f] == C.STT_FUNC}
    changed |= forced
    # KPATCH_IGNORE_STATIC("x"): the static local x gets a fresh copy instead of the kernel's
    fresh_statics = _pointed_strings(p, ".kpatch.ignore.data") | _pointed_strings(p, ".kpatch.ignore.static")
    by_name = {p.sym_names[i]: i for i in range(p.nsym) if p.stype[i] == C.STT_FUNC and p.defined[i]}
    # A changed .cold part changes its parent: the parent's jumps into it must reach the new copy.
    for i in list(changed):
        parent = clone_parent(p.sym_names[i])
        if parent and by_name.get(parent) is not None and p.stype[i] == C.STT_FUNC:
            changed.add(by_name[parent])

    # work items: (section, lo, hi): the bytes whose references are followed; a section shared by several
    # symbols (sharedsec.py) is followed one included symbol (or anonymous gap) at a time
    work: list[tuple[int, int, int]] = []
    gaps: set[tuple[int, int, int]] = set()

    def include(sym: int, why: str) -> None:
        if sym in sel.included:
            return
        sel.included[sym] = why
        sec = int(p.shndx[sym])
        if is_shared(p, arch, sec):
            sel.sections.setdefault(sec, f"holds {p.sym_names[sym]}")
            work.append((sec, int(p.value[sym]), int(p.value[sym]) + int(p.size[sym])))
            for m in p.syms_in_section[sec]:  # aliases (foo.localalias, still-folded twins) come along
                if m != sym and p.value[m] == p.value[sym] and p.size[m] == p.size[sym] \
                        and p.stype[m] == p.stype[sym]:
                    include(m, f"alias of {p.sym_names[sym]} (same bytes)")
        elif sec not in sel.sections:
            sel.sections[sec] = f"holds {p.sym_names[sym]}"
            work.append((sec, 0, int(p.shdrs["size"][sec])))

    for i in sorted(changed):
        name = p.sym_names[i]
        secname = p.sec_names[int(p.shndx[i])]
        if p.stype[i] == C.STT_OBJECT:
            continue  # judged below, once we know which data the patch uses
        if _is_init(secname):
            sel.refusals.append(f"changed function {name} is in {secname}: init/exit code has already run "
                                "(or been freed) in the running kernel, so a live patch cannot change it")
            continue
        why = "forced by KPATCH_FORCE_UNSAFE" if i in forced and status.get(i) != CHANGED else \
            f"changed: {cmp.why.get(i, '')}".rstrip(": ")
        include(i, why)
        if not clone_parent(name):
            sel.patched.append(i)
    # Every included function brings its .cold parts.
    for i in list(sel.included):
        _include_cold(p, i, by_name, include)
    # New global functions and data: other code may use them (kpatch does the same).
    for i, s in status.items():
        if s == NEW and p.sbind[i] != C.STB_LOCAL and i not in ign_funcs \
                and not _is_init(p.sec_names[int(p.shndx[i])]):
            include(i, "new global")
    # Callbacks (kpatch-macros.h KPATCH_*_CALLBACK).
    for sec in range(1, p.nsec):
        n = p.sec_names[sec]
        if n.startswith(".kpatch.callbacks."):
            kind = n[len(".kpatch.callbacks."):]
            r = p.relocs(sec)
            first = r[r["offset"] == 0]
            if len(first):
                t, _ = resolve_target(p, arch, int(first["sym"][0]), int(first["type"][0]),
                                      int(first["addend"][0]))
                sel.callbacks[kind] = t
                include(t, f"{kind} callback")

    # Identical-code-folded functions the patch unfolds: the other members keep their old code.
    sel.refusals.extend(split_folded(corr, sel.patched, include, _is_init, is_special_section))
    for i in list(sel.included):
        _include_cold(p, i, by_name, include)

    # Follow relocations of everything included; a TOC section is followed one used slot at a time.
    slots: list[tuple[int, int, str]] = []
    while work or slots:
        if slots:
            sec, off, owner_names = slots.pop()
            r = p.relocs(sec)
            r = r[r["offset"] == off]
        else:
            sec, lo, hi = work.pop()
            members = [m for m in p.syms_in_section.get(sec, []) if lo <= int(p.value[m]) < hi]
            owner_names = ", ".join(p.sym_names[m] for m in members) or p.sec_names[sec]
            r = p.relocs(sec)
            if is_shared(p, arch, sec):
                r = r[(r["offset"] >= lo) & (r["offset"] < hi)]
                if p.is_text(sec):  # branches the assembler resolved inside the section count too
                    r = np.concatenate([r, resolved_refs(p, arch, sec, lo, hi)[0]])
        for s, t_, a, roff in zip(r["sym"].tolist(), r["type"].tolist(), r["addend"].tolist(),
                                  r["offset"].tolist(), strict=True):
            t, _ = resolve_target(p, arch, s, t_, a, (sec, roff))
            if not p.defined[t]:
                continue
            tsec = int(p.shndx[t])
            tname = p.sec_names[tsec]
            if tname in arch.toc_sections and p.stype[t] == C.STT_SECTION:
                off = a + arch.pcrel_bias.get(t_, 0)
                used = sel.toc_slots.setdefault(tsec, set())
                sel.sections.setdefault(tsec, f"TOC slots used by {owner_names}")
                if off not in used:
                    used.add(off)
                    slots.append((tsec, off, owner_names))
                continue
            if p.stype[t] == C.STT_SECTION:
                if is_shared(p, arch, tsec):  # anonymous bytes beside symbols: that gap alone
                    g = (tsec, *gap(p, tsec, place_of(p, arch, t_, a, (sec, roff))))
                    if g not in gaps:
                        gaps.add(g)
                        sel.sections.setdefault(tsec, f"used by {owner_names}")
                        work.append(g)
                    continue
                if tsec not in sel.sections and not is_ignored_section(tname):
                    if is_special_section(tname) and not is_aux_code(tname):
                        continue
                    sel.sections[tsec] = f"used by {owner_names}"
                    work.append((tsec, 0, int(p.shdrs["size"][tsec])))
                continue
            st = status.get(t)
            name = p.sym_names[t]
            if st == NEW or (corr.p2o[t] < 0 and p.stype[t] in (C.STT_FUNC, C.STT_OBJECT, C.STT_NOTYPE)) \
                    or (p.stype[t] == C.STT_OBJECT and canonical(name) in fresh_statics):
                kind = "function" if p.stype[t] == C.STT_FUNC else "data"
                why = (f"fresh copy of {name} (KPATCH_IGNORE_STATIC), used by {owner_names}"
                       if canonical(name) in fresh_statics and corr.p2o[t] >= 0 else
                       f"fresh copy of special static {name}, used by {owner_names}"
                       if is_special_static(name) or name.startswith(".L")
                       else f"new {kind}, used by {owner_names}")
                include(t, why)
                if p.stype[t] == C.STT_FUNC:
                    _include_cold(p, t, by_name, include)
            elif st == CHANGED and p.stype[t] == C.STT_FUNC and t not in sel.included and t not in ign_funcs:
                include(t, f"changed: {cmp.why.get(t, '')}")
                if not clone_parent(name) and not _is_init(tname):
                    sel.patched.append(t)

    # an ambiguous static paired only by position matters once included code uses it (statics.py); one
    # that KPATCH_IGNORE_STATIC gives a fresh copy does not: which kernel variable it was is moot
    amb_users = users_of(p, {i for i in corr.ambiguous if corr.p2o[i] >= 0})
    for i, why in sorted(corr.ambiguous.items()):
        if corr.p2o[i] < 0:
            refuse = i in sel.included
        else:
            refuse = canonical(p.sym_names[i]) not in fresh_statics \
                and (i in sel.included or any(u in sel.included for u in amb_users.get(i, ())))
        if refuse:
            sel.refusals.append(why)
    _judge_data(corr, cmp, sel, ign_secs)
    if require_ftrace:  # Xen redirects with a jump it writes itself: no ftrace entry needed
        _check_entries(corr, arch, sel)
    _check_branches(p, arch, sel)
    _check_groups(p, sel)
    if cmp.removed:
        for oi in cmp.removed:
            if o.stype[oi] == C.STT_FUNC and not is_special_static(o.sym_names[oi]):
                sel.warnings.append(f"function {o.sym_names[oi]} no longer exists in the patched object; "
                                    "the running kernel keeps its old copy for callers that are not patched")
    sel.patched = _one_per_address(p, sorted(set(sel.patched), key=lambda i: p.sym_names[i]))
    return sel


def _one_per_address(p: Object, funcs: list[int]) -> list[int]:
    """Aliases (``foo`` and ``foo.localalias``, identical-code-folded twins) share one body: ftrace
    redirects it once, so keep one name per (section, offset), preferring a global, then the shortest."""
    best: dict[tuple[int, int], int] = {}
    for f in funcs:
        k = (int(p.shndx[f]), int(p.value[f]))
        cur = best.get(k)
        rank = (p.sbind[f] == C.STB_LOCAL, ".localalias" in p.sym_names[f], len(p.sym_names[f]))
        if cur is None or rank < (p.sbind[cur] == C.STB_LOCAL, ".localalias" in p.sym_names[cur],
                                  len(p.sym_names[cur])):
            best[k] = f
    keep = set(best.values())
    return [f for f in funcs if f in keep]


def _include_cold(p: Object, f: int, by_name: dict[str, int], include: Callable[[int, str], None]) -> None:
    base = p.sym_names[f]
    for n, i in by_name.items():
        if clone_parent(n) == base:
            include(i, f".cold part of {base}: its jumps return into the new {base}")


def _judge_data(corr: Correlation, cmp: Comparison, sel: Selection, ign_secs: set[str]) -> None:
    p = corr.patched
    for i, s in cmp.status.items():
        if s != CHANGED or p.stype[i] != C.STT_OBJECT:
            continue
        secname = p.sec_names[int(p.shndx[i])]
        if secname in ign_secs or is_special_section(secname) or _is_init(secname):
            continue
        sel.refusals.append(f"data {p.sym_names[i]} ({secname}) changed ({cmp.why.get(i, 'content differs')}): "
                            "a live patch cannot change data that already exists in the running kernel; "
                            "keep the old layout and use a shadow variable (klp_shadow_*) or a callback")
    for sec, why in cmp.changed_sections.items():
        name = p.sec_names[sec]
        if sec in sel.sections or name in ign_secs or is_special_section(name) \
                or p.section_flags(sec) & C.SHF_STRINGS or is_ignored_section(name):
            continue
        if why == "new section" and not (p.section_flags(sec) & C.SHF_WRITE):
            continue  # unused new rodata (a literal of an unchanged inline copy) is harmless
        sel.refusals.append(f"section {name} changed ({why}) but no changed function uses it: "
                            + ("init code and data have already run in the running kernel"
                               if _is_init(name) else "the change could not take effect in a live patch"))


def _check_entries(corr: Correlation, arch: Arch, sel: Selection) -> None:
    """Every replaced function's ORIGINAL must have an ftrace entry: that is what the kernel redirects.
    Fills ``sel.has_fentry`` (patched symbols whose original has one)."""
    o, p = corr.orig, corr.patched
    twins = {i: int(corr.p2o[i]) for i in sel.patched if corr.p2o[i] >= 0}
    ok = with_entry(o, arch, set(twins.values()))
    sel.has_fentry = {i for i, oi in twins.items() if oi in ok}
    for i in sel.patched:
        if i in twins and i not in sel.has_fentry:
            sel.refusals.append(f"function {p.sym_names[i]} has no ftrace entry in the original object (notrace, "
                                "noinstr, or built without ftrace), so the running kernel cannot redirect it")


def _check_branches(p: Object, arch: Arch, sel: Selection) -> None:
    """Direct branches from included code to code that stays in the running kernel go through a stub the
    module loader makes, which switches to the kernel's TOC (ppc64). 6.1's loader then needs the caller's
    TOC-restore slot: a nop right after the call. A tail call has none, and the stub would overwrite the
    TOC saved in our caller's frame, so both are refused (kpatch refuses the tail call too)."""
    if not arch.branch_relocs:
        return
    from .disasm import mnemonic_at

    for sec in sorted(sel.sections):
        if not p.is_text(sec) or is_aux_code(p.sec_names[sec]):
            continue
        r = p.relocs(sec)
        r = r[np.isin(r["type"], arch.branch_relocs)]
        if not len(r):
            continue
        data = p.section_data(sec)
        for x in r:
            s, off = int(x["sym"]), int(x["offset"])
            t, _ = resolve_target(p, arch, s, int(x["type"]), int(x["addend"]))
            name = p.sym_names[t] if p.stype[t] != C.STT_SECTION else p.sec_names[int(p.shndx[t])]
            if name in arch.loader_symbols or t in sel.included or \
                    (p.defined[t] and int(p.shndx[t]) in sel.sections and p.stype[t] == C.STT_SECTION):
                continue
            start = off - off % arch.insn_width if arch.insn_width else off
            mn = mnemonic_at(arch, data, start)
            owner = p.symbol_at(sec, start)
            base = int(p.value[owner]) if owner >= 0 else 0
            where = f"{p.sym_names[owner] if owner >= 0 else p.sec_names[sec]}+{start - base:#x}"
            if mn in arch.tail_mnemonics:
                sel.refusals.append(f"sibling call at {where} to {name}, which stays in the running kernel: the "
                                    "stub that reaches it would clobber the caller's saved TOC; build the function "
                                    "with __attribute__((optimize(\"no-optimize-sibling-calls\")))")
            elif mnemonic_at(arch, data, start + arch.insn_width) != "nop":
                sel.refusals.append(f"call at {where} to {name}, which stays in the running kernel, has no nop "
                                    "after it for the loader to restore the TOC into")


def _check_groups(p: Object, sel: Selection) -> None:
    for g in p.elf.groups():
        for m in g.members:
            if m in sel.sections and p.is_text(m):
                sel.refusals.append(f"changed section {p.sec_names[m]} is part of a section group (COMDAT): "
                                    "the linker keeps one copy per group, which a live patch cannot replace")
