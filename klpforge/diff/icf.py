"""Functions GCC folded into one body (identical code folding), for the *select* stage.

With ``-fipa-icf`` (on at -O2) GCC makes two static functions with the same code one body at one address,
each name a symbol there; the ipa-clones dump records nothing. klp_func redirects an *address*, so
replacing one of them redirects all of them. When the patch breaks the fold (the twins no longer share
an address in the patched object) and replaces one member, every other member must keep its own old
behaviour: its patched body (the same code as before) goes into the live patch as a new function and
every function that calls it is replaced, so that its calls reach that copy instead of the redirected
address. Where that cannot be done (a global member, whose callers live in other objects; a member whose
address is stored in data; a caller in init code), the diff refuses, naming both functions.

Functions that still share an address in the patched object are aliases (``foo``/``foo.localalias``, or
still folded): one replacement serves both, as before.

>>> fold_groups(Object.load("icf.o"))  # doctest: +SKIP
[[3, 4]]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..elf import constants as C
from .arch import arch_for
from .correlation import Correlation
from .model import Object, is_ignored_section
from .names import clone_parent
from .sharedsec import resolved_targets
from .statics import users_of

__all__ = ["fold_groups", "split_folded"]


def fold_groups(obj: Object) -> list[list[int]]:
    """Sets of two or more sized function symbols at one (section, address) of ``obj``, each sorted by
    symbol index. Shape: ``[[symbol, ...], ...]``."""
    funcs = np.flatnonzero(obj.defined & (obj.stype == C.STT_FUNC) & (obj.size > 0) & ~obj.is_prefix)
    # one sort by (section, address, index); runs of two or more equal places are the groups, listed in
    # the order their first symbol appears in the symbol table
    order = np.lexsort((funcs, obj.value[funcs], obj.shndx[funcs]))
    f, sec, val = funcs[order], obj.shndx[funcs][order], obj.value[funcs][order]
    new = np.ones(len(f), bool)
    new[1:] = (sec[1:] != sec[:-1]) | (val[1:] != val[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(f))
    big = (ends - starts) > 1
    fl = f.tolist()
    groups = [fl[a:b] for a, b in zip(starts[big].tolist(), ends[big].tolist(), strict=True)]
    groups.sort(key=lambda g: g[0])
    return groups


def _rank(p: Object, f: int) -> tuple[bool, bool, int, str]:
    n = p.sym_names[f]
    return (p.sbind[f] == C.STB_LOCAL, ".localalias" in n, len(n), n)


def split_folded(corr: Correlation, patched: list[int], include: Callable[[int, str], None],
                 is_init: Callable[[str], bool], is_special: Callable[[str], bool]) -> list[str]:
    """Undo, in the live patch, the folds of the original object that the patch breaks (module docstring).

    ``patched``: the functions to be replaced so far (patched symbols), updated in place: a folded member
    that does not keep the shared address leaves it, the callers of its copy join it. ``include`` adds a
    patched symbol to the live patch. Returns refusals (one line each)."""
    o, p = corr.orig, corr.patched
    refusals: list[str] = []
    replaced = set(patched)
    for group in fold_groups(o):
        twins = {oi: int(corr.o2p[oi]) for oi in group if corr.o2p[oi] >= 0}
        if len({(int(p.shndx[t]), int(p.value[t])) for t in twins.values()}) < 2:
            continue  # still one body (an alias, or still folded): one replacement serves every name
        redirected = [t for t in twins.values() if t in replaced]
        if not redirected:
            continue  # the shared address keeps its old code: calls to it stay correct
        keeper = min(redirected, key=lambda t: _rank(p, t))
        kname = p.sym_names[keeper]
        for oi, g in sorted(twins.items()):
            if g == keeper:
                continue
            gname = p.sym_names[g]
            fold = (f"{kname} and {gname} were one body at one address in the original object (GCC's "
                    f"identical code folding, -fipa-icf): replacing {kname} redirects {gname} too")
            if o.sbind[oi] != C.STB_LOCAL or p.sbind[g] != C.STB_LOCAL:
                refusals.append(f"{fold}, and {gname} is global, so its callers in other objects cannot be "
                                f"moved to a copy of its old body")
                continue
            data_refs = _data_referrers(p, g, is_special)
            if data_refs:
                refusals.append(f"{fold}, and the address of {gname} is stored in {', '.join(data_refs)}, "
                                "which stays in the running kernel")
                continue
            callers = {c for c in users_of(p, {g}).get(g, set()) if p.stype[c] == C.STT_FUNC}
            resolved = _resolved_callers(p, g)
            if resolved is None:
                refusals.append(f"{fold}, and {gname} shares its section {p.sec_names[int(p.shndx[g])]} with "
                                f"other code, whose calls to it the assembler resolved without relocations; on "
                                f"{arch_for(p.elf.machine).name} klpforge cannot find them all to move them to a "
                                "copy of its old body: build with -ffunction-sections")
                continue
            callers |= resolved
            callers = {_parent(p, c) for c in callers} - {g}
            bad = sorted(p.sym_names[c] for c in callers if is_init(p.sec_names[int(p.shndx[c])]))
            if bad:
                refusals.append(f"{fold}, and {gname} is called from init code ({', '.join(bad)}), which a live "
                                "patch cannot replace")
                continue
            if g in replaced:
                patched.remove(g)
                replaced.discard(g)
            include(g, f"copy of {gname}: folded with {kname} in the running kernel (identical code "
                       f"folding), whose replacement redirects the shared address")
            for c in sorted(callers):
                include(c, f"calls {gname}, which was folded with the replaced {kname}: now calls the copy")
                if c not in replaced and not clone_parent(p.sym_names[c]):
                    patched.append(c)
                    replaced.add(c)
    return refusals


def _resolved_callers(p: Object, g: int) -> set[int] | None:
    """Functions of ``g``'s own section that reach ``g`` through a displacement the assembler resolved (no
    relocation: one ``.text`` without ``-ffunction-sections``). None when they cannot all be found: another
    architecture than x86-64 with other functions in that section (sharedsec.resolved_targets)."""
    sec = int(p.shndx[g])
    others = [m for m in p.syms_in_section.get(sec, [])
              if p.value[m] != p.value[g] and p.stype[m] == C.STT_FUNC]
    if not others:
        return set()
    arch = arch_for(p.elf.machine)
    if arch.machine != C.EM_X86_64:
        return None
    out = set()
    for m in others:
        lo, hi = p.sym_range(m)
        # by address: a member still folded with g in the patched object is the same body
        if (resolved_targets(p, arch, sec, lo, hi) == int(p.value[g])).any():
            out.add(int(m))
    return out


def _parent(p: Object, f: int) -> int:
    """The function a ``.cold`` part belongs to (the part itself when none is found)."""
    parent = clone_parent(p.sym_names[f])
    if parent is None:
        return f
    for i in np.flatnonzero(p.defined & (p.stype == C.STT_FUNC)).tolist():
        if p.sym_names[i] == parent:
            return int(i)
    return f


def _data_referrers(p: Object, g: int, is_special: Callable[[str], bool]) -> list[str]:
    """Names of the non-code sections (other than metadata and special tables) that hold ``g``'s address."""
    sec_sym = int(p.section_symbol[int(p.shndx[g])])
    lo, hi = p.sym_range(g)
    out = []
    for tgt, _ in p.elf.reloc_sections.items():
        if tgt >= p.nsec or p.is_text(tgt):
            continue
        name = p.sec_names[tgt]
        if is_ignored_section(name) or is_special(name) or not p.section_flags(tgt) & C.SHF_ALLOC:
            continue
        r = p.relocs(tgt)
        s = r["sym"].astype(np.int64)
        hit = (s == g) | ((s == sec_sym) & (r["addend"] >= lo) & (r["addend"] < hi))
        if hit.any():
            out.append(name)
    return out
