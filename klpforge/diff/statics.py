"""Pairing of function-scope static variables (part of the *correlate* stage).

GCC names a function's ``static int count`` ``count.N``, with N counted over the whole translation unit,
so a patch that adds, removes or reorders any such static renumbers the others, and a clone
(``.constprop``/``.isra``/``.part``) or an inlining moves the code that uses one. A static is therefore paired
through what uses it, never through its number or its position: each side's *users* are the source
functions (clone suffixes removed) whose code, and the data objects whose bytes, reference it (GCC 12
naming; clang's ``func.var`` form of macro statics is left to correlate's rules). Two statics pair when

1. their user sets are equal and no other static of the name on either side has that set (several of one
   name in the same functions, as a macro's block-scope statics, pair by what they hold: size, initial bytes,
   relocation targets; those that nothing tells apart are paired in declaration order only so that unchanged
   users compare equal, and recorded as ambiguous: select refuses a patch whose included code uses one), else
2. they are each other's only *compatible* candidate: the user sets overlap, once a user that exists on
   one side only (inlined away on the other) is widened to its callers on its own side.

A patched static with no compatible candidate is new (a fresh variable in the live patch); one with
several is *ambiguous*: recorded so that select refuses a patch that would use it, naming it.

>>> pair_statics(corr, [([4, 7], [4, 7, 10])])  # count.1/count.0 vs count.1/count.0/count.2  # doctest: +SKIP
{}
>>> corr.reasons[4]  # doctest: +SKIP
'static local referenced by the same functions'
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from ..elf import constants as C
from ..elf.file import cstring_at
from ..util.arrays import isin, unique
from .arch import arch_for
from .correlation import Correlation, pair
from .model import Object
from .names import base_function, is_special_static
from .pcrel import pcrel_tails

__all__ = ["is_static_local", "users_of", "pair_statics"]

_NUMBERED = re.compile(r"\.\d+$")


def is_static_local(obj: Object, i: int) -> bool:
    """True for a local data object carrying GCC's per-unit number (``count.3``): a function-scope static."""
    name = obj.sym_names[i]
    if obj.stype[i] != C.STT_OBJECT or obj.sbind[i] != C.STB_LOCAL or _NUMBERED.search(name) is None:
        return False
    # clang spells a macro's per-use-site static ``func.__key.3``: a special static, left to correlate's rules
    return not any(is_special_static(part) for part in name.split(".")[1:-1])


def _number(name: str) -> int:
    m = _NUMBERED.search(name)
    return int(m.group()[1:]) if m else -1


def users_of(obj: Object, wanted: set[int]) -> dict[int, set[int]]:
    """For each symbol of ``wanted``: the function and data symbols whose bytes reference it (directly,
    through its section symbol plus an offset, or through a ppc64 TOC slot; a compound literal's user is the
    table holding its address). Shape: ``{symbol: {function or object symbol}}``; a symbol nobody
    references is absent. Works with or without ``-ffunction-sections``: the referencing symbol is the one
    covering the relocation's place."""
    out: dict[int, set[int]] = defaultdict(set)
    if not wanted:
        return out
    arch = arch_for(obj.elf.machine)
    rel, relsec, _ = obj.all_relocs
    w = np.fromiter(wanted, np.int64)
    wsecs = obj.shndx[w]
    secsyms = obj.section_symbol[wsecs[(wsecs > 0) & (wsecs < obj.nsec)]]
    tocs = [int(obj.section_symbol[i]) for i, n in enumerate(obj.sec_names) if n in arch.toc_sections]
    targets = np.concatenate([w, secsyms[secsyms >= 0], np.array(tocs, np.int64)])
    hit = np.flatnonzero(isin(rel["sym"].astype(np.int64), targets))
    alloc = (obj.shdrs["flags"].astype(np.int64) & C.SHF_ALLOC) != 0
    hs = relsec[hit].astype(np.int64)
    hit = hit[(hs > 0) & (hs < obj.nsec) & alloc[np.clip(hs, 0, obj.nsec - 1)]]
    if not len(hit):
        return out
    users = _covering(obj, relsec[hit].astype(np.int64), rel["offset"][hit].astype(np.int64))
    ok = users >= 0
    ok[ok] = isin(obj.stype[users[ok]], (C.STT_FUNC, C.STT_OBJECT))
    hit, users = hit[ok], users[ok]
    syms = rel["sym"][hit].astype(np.int64)
    adds = rel["addend"][hit].astype(np.int64)
    types = rel["type"][hit].astype(np.int64)
    tsec = obj.shndx[syms]
    is_sec = obj.stype[syms] == C.STT_SECTION
    toc = np.zeros(len(hit), bool)
    if tocs:  # ppc64: code reaches data through a TOC slot, whose relocation names the static
        toc = is_sec & isin(obj.section_symbol[np.clip(tsec, 0, obj.nsec - 1)], tocs)
        for ts in unique(tsec[toc]).tolist():
            j = np.flatnonzero(toc & (tsec == ts))
            slots = obj.relocs(int(ts))
            k = np.minimum(np.searchsorted(slots["offset"].astype(np.int64), adds[j]), max(len(slots) - 1, 0))
            found = (slots["offset"][k].astype(np.int64) == adds[j]) if len(slots) else np.zeros(len(j), bool)
            j, k = j[found], k[found]
            syms[j] = slots["sym"][k].astype(np.int64)
            adds[j] = slots["addend"][k].astype(np.int64)
            types[j] = slots["type"][k].astype(np.int64)
        tsec = obj.shndx[syms]
        is_sec = obj.stype[syms] == C.STT_SECTION
    bias = np.zeros(len(types), np.int64)
    for t, b in arch.pcrel_bias.items():
        bias[types == t] = b
    if not tocs:  # x86-64: ``addl $1, c(%rip)`` into a shared .bss stores c-5, the neighbour's end
        bias += pcrel_tails(obj, arch, rel[hit], relsec[hit].astype(np.int64))
    target = syms.copy()
    target[is_sec] = _covering(obj, tsec[is_sec], adds[is_sec] + bias[is_sec])
    keep = isin(target, w)
    for s_, f_ in zip(target[keep].tolist(), users[keep].tolist(), strict=True):
        out[s_].add(f_)
    return out


def _covering(obj: Object, secs: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """:meth:`Object.symbol_at` for many (section, offset) places at once (-1 where none): the symbol
    covering the place, else one ending exactly there (``&array[N]``); a section owned by its one symbol
    maps every place to it."""
    out = np.full(len(secs), -1, np.int64)
    if not len(secs):
        return out
    order = np.argsort(secs, kind="stable")
    ss = secs[order]
    cuts = np.flatnonzero(np.diff(ss)) + 1
    for grp in np.split(order, cuts):
        sec = int(secs[grp[0]])
        members = obj.syms_in_section.get(sec)
        if not 0 < sec < obj.nsec or not members:
            continue
        if len(members) == 1 and obj.section_owner[sec] == members[0]:
            out[grp] = members[0]
            continue
        starts, ends, msyms, _prev = obj.sorted_members(sec)
        o = offs[grp]
        k = np.searchsorted(starts, o, side="right") - 1
        kk = np.clip(k, 0, None)
        cover = (k >= 0) & (ends[kk] > o)
        at_end = (k >= 0) & ~cover & (starts[kk] + obj.size[msyms[kk]] == o)
        out[grp] = np.where(cover | at_end, msyms[kk], -1)
    return out


def _signature(obj: Object, i: int) -> tuple[object, ...]:
    """What a static holds, independent of GCC's number: its size, its initial bytes (None in ``.bss``) and
    what its relocations name (a string's text for a merged-string target)."""
    sec = int(obj.shndx[i])
    if not 0 < sec < obj.nsec:
        return (int(obj.size[i]),)
    lo, hi = obj.sym_range(i)
    data = None if int(obj.shdrs["type"][sec]) == C.SHT_NOBITS else bytes(obj.section_data(sec)[lo:hi])
    refs = []
    r = obj.relocs(sec)
    for off, sym, typ, add in zip(r["offset"].tolist(), r["sym"].tolist(), r["type"].tolist(), r["addend"].tolist(),
                                  strict=True):
        if lo <= off < hi:
            t = obj.shndx[sym]
            what: object = _NUMBERED.sub("", obj.sym_names[sym])  # another static's number says nothing either
            if obj.stype[sym] == C.STT_SECTION and 0 < t < obj.nsec:
                c = obj.symbol_at(int(t), add)
                what = (cstring_at(obj.section_data(int(t)), add) if obj.section_flags(int(t)) & C.SHF_STRINGS
                        else _NUMBERED.sub("", obj.sym_names[c] if c >= 0 else obj.sec_names[int(t)]))
            refs.append((off - lo, typ, what))
    return (int(obj.size[i]), data, tuple(refs))


def _callers(obj: Object, funcs: set[int]) -> dict[int, set[int]]:
    """Functions whose code references each of ``funcs`` (calls, tail calls, address taken)."""
    return users_of(obj, funcs) if funcs else {}


def pair_statics(corr: Correlation, groups: list[tuple[list[int], list[int]]]) -> dict[int, str]:
    """Pair the still-unpaired statics of each ``(orig list, patched list)`` group (one canonical name each)
    by their users (see the module docstring); fills ``corr`` and returns the ambiguous patched statics
    as ``{patched symbol: reason}``."""

    o, p = corr.orig, corr.patched
    all_o = {i for ol, _ in groups for i in ol}
    all_p = {i for _, pl in groups for i in pl}
    ou, pu = users_of(o, all_o), users_of(p, all_p)
    # Statics folded into one object (``-fipa-icf`` merges identical read-only variables: several names at
    # one place) pair as one: their users are the union, and the other names follow their representative.
    ofold, pfold = _folded(o, all_o, ou), _folded(p, all_p, pu)
    groups = [([i for i in ol if i not in ofold["alias"]], [i for i in pl if i not in pfold["alias"]])
              for ol, pl in groups]

    def names(obj: Object, fs: set[int]) -> frozenset[str]:
        return frozenset(base_function(obj.sym_names[f]) for f in fs)

    # Users that exist on one side only (inlined away on the other) widen to their callers.
    o_funcs = {base_function(o.sym_names[i]) for i in np.flatnonzero(o.defined & (o.stype == C.STT_FUNC))}
    p_funcs = {base_function(p.sym_names[i]) for i in np.flatnonzero(p.defined & (p.stype == C.STT_FUNC))}
    o_gone = {f for fs in ou.values() for f in fs if base_function(o.sym_names[f]) not in p_funcs}
    p_gone = {f for fs in pu.values() for f in fs if base_function(p.sym_names[f]) not in o_funcs}
    ocall, pcall = _callers(o, o_gone), _callers(p, p_gone)

    def widened(obj: Object, fs: set[int], gone: set[int], calls: dict[int, set[int]]) -> frozenset[str]:
        out = set(names(obj, fs))
        for f in fs & gone:
            out |= names(obj, calls.get(f, set()))
        return frozenset(out)

    ambiguous: dict[int, str] = {}
    for olist, plist in groups:
        okey = {i: names(o, ou.get(i, set())) for i in olist}
        pkey = {i: names(p, pu.get(i, set())) for i in plist}
        # 1. equal, unique user sets
        ocount: dict[frozenset[str], list[int]] = defaultdict(list)
        pcount: dict[frozenset[str], list[int]] = defaultdict(list)
        for i, k in okey.items():
            if k:
                ocount[k].append(i)
        for i, k in pkey.items():
            if k:
                pcount[k].append(i)
        for k, os_ in ocount.items():
            ps = pcount.get(k)
            if ps and len(os_) == 1 and len(ps) == 1:
                pair(corr, os_[0], ps[0], "static local referenced by the same functions")
        # 1b. several of one name used by the same functions (block-scope statics, a macro's statics, two
        # inlined functions' ``count``): GCC's number says nothing about which is which once the patch
        # reorders them, so only what they hold tells them apart. The rest pair in declaration order only
        # so that unchanged users still compare equal; they are recorded as ambiguous, and select refuses
        # a live patch whose included code uses one.
        for k, os_ in ocount.items():
            ps = [i for i in pcount.get(k, []) if corr.p2o[i] < 0]
            os_ = [i for i in os_ if corr.o2p[i] < 0]
            if len(os_) < 2 or len(os_) != len(ps):
                continue
            osig = {i: _signature(o, i) for i in os_}
            psig = {i: _signature(p, i) for i in ps}
            for a in list(os_):
                twins = [b for b in ps if psig[b] == osig[a]]
                if len(twins) == 1 and [x for x in os_ if osig[x] == osig[a]] == [a]:
                    pair(corr, a, twins[0], "static local of the same functions with its own size and initial value")
                    os_.remove(a)
                    ps.remove(twins[0])
            if len(os_) == 1:  # the others are told apart: this one is what is left on both sides
                pair(corr, os_[0], ps[0], "static local of the same functions, the one left when the others pair")
                continue
            if not os_ or not all(o.size[a] == p.size[b] for a, b in zip(os_, ps, strict=True)):
                continue
            os_.sort(key=lambda i: _number(o.sym_names[i]))
            ps.sort(key=lambda i: _number(p.sym_names[i]))
            users = ", ".join(sorted(k))
            for a, b in zip(os_, ps, strict=True):
                pair(corr, a, b, "static locals of the same functions, in declaration order (ambiguous)")
            for b in ps:
                ambiguous[b] = (f"static local {p.sym_names[b]} (used by {users}) cannot be correlated: "
                                f"{len(ps)} statics of that name are used by the same functions and hold the "
                                "same size and initial value, so nothing tells which of the running kernel's "
                                f"{', '.join(o.sym_names[a] for a in os_)} it is; pairing by GCC's number or "
                                "position could bind the patch to another variable")
        # 2. the only compatible candidate on both sides
        orest = [i for i in olist if corr.o2p[i] < 0]
        prest = [i for i in plist if corr.p2o[i] < 0]
        if not orest or not prest:
            continue
        if len(olist) == len(plist) == 1 and (not okey[olist[0]] or not pkey[plist[0]]):
            # the only one of its name on each side, and no code use to tell otherwise
            pair(corr, olist[0], plist[0], "the only static local of this name")
            continue
        ow = {i: widened(o, ou.get(i, set()), o_gone, ocall) for i in orest}
        pw = {i: widened(p, pu.get(i, set()), p_gone, pcall) for i in prest}
        compat: dict[int, list[int]] = {pi: [oi for oi in orest if (pkey[pi] & ow[oi]) or (pw[pi] & okey[oi])]
                                        for pi in prest}
        back: dict[int, list[int]] = defaultdict(list)
        for pi, os_ in compat.items():
            for oi in os_:
                back[oi].append(pi)
        for pi, os_ in compat.items():
            if len(os_) == 1 and len(back[os_[0]]) == 1:
                pair(corr, os_[0], pi, "static local whose users correspond (clone, inlining)")
            elif os_ or (not pkey[pi] and orest):
                os_ = os_ or orest
                users = ", ".join(sorted(pkey[pi])) or "no function"
                cands = "; ".join(f"{o.sym_names[oi]} of {', '.join(sorted(okey[oi])) or 'no function'}"
                                  for oi in os_)
                ambiguous[pi] = (f"static local {p.sym_names[pi]} (used by {users}) cannot be correlated: "
                                 f"it may be the running kernel's {cands}; pairing it by GCC's number "
                                 "or position could bind the patch to another function's variable")
    for orep, omembers in ofold["members"].items():
        prep = int(corr.o2p[orep])
        for a, b in zip(omembers, pfold["members"].get(prep, [prep]), strict=False):
            if corr.o2p[a] < 0 and corr.p2o[b] < 0:
                pair(corr, a, b, f"another name of the folded static {o.sym_names[orep]} (identical-code "
                                  "folding: one object at one place)")
    return ambiguous


def _folded(obj: Object, statics: set[int], users: dict[int, set[int]]) -> dict[str, dict[int, list[int]]]:
    """Statics of one canonical name at one (section, offset, size): GCC's ``-fipa-icf`` folded them into
    one object. Returns ``{"members": {representative: [other names, by GCC number]}, "alias": {other name:
    representative}}``; the representative is the name references resolve to (``Object.symbol_at``) and
    gets the union of the names' users (``users`` is updated)."""
    by: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
    for i in statics:
        if obj.defined[i] and int(obj.size[i]):
            by[(_NUMBERED.sub("", obj.sym_names[i]), int(obj.shndx[i]), int(obj.value[i]), int(obj.size[i]))].append(i)
    members: dict[int, list[int]] = {}
    alias: dict[int, list[int]] = {}
    for (_, sec, value, _), ms in by.items():
        if len(ms) < 2:
            continue
        rep = obj.symbol_at(sec, value)
        rep = rep if rep in ms else min(ms, key=lambda i: _number(obj.sym_names[i]))
        rest = sorted((m for m in ms if m != rep), key=lambda i: _number(obj.sym_names[i]))
        members[rep] = rest
        for m in rest:
            alias[m] = [rep]
            users.setdefault(rep, set()).update(users.pop(m, set()))
    return {"members": members, "alias": alias}
