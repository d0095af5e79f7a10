"""The *correlate* stage: pair every symbol and section of the original object with its twin.

Rules, tried in order; each pair records which rule matched it, for the JSON report:

1. ``STT_FILE`` symbols, and undefined symbols, by exact name.
2. Global symbols by exact name.
3. Local symbols by (FILE scope, canonical name, type): GCC's clone and static-local numbers are
   ignored, so ``foo.isra.0`` pairs with ``foo.isra.1`` when each is the only one of its kind.
4. Several candidates with one canonical name: functions by identical code, then identical name, then
   position.
5. A symbol whose binding changed (``static`` added or removed): by canonical name alone, if unique.
6. Function-scope statics (``x.3``) last, through the functions that use them, never by number or
   position (klpforge/diff/statics.py); one with several plausible twins is left ambiguous.

Never correlated: special statics (``__key``, ``__warned``, ``CSWTCH``, ...: the patch gets its own copy)
and assembler labels (``.LC0``: compared by content). Sections follow the function or object they hold;
other sections pair by name.

>>> corr = correlate(Object.load("a.o"), Object.load("b.o"))
>>> corr.reason_for_orig(corr.p2o.tolist().index(5))
'same name up to GCC clone number'
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial

import numpy as np

from ..elf import constants as C
from ..util.arrays import isin, unique
from .arch import arch_for
from .correlation import Correlation, pair
from .model import Object
from .names import canonical, is_local_label, is_special_static, section_subject
from .statics import is_static_local, pair_statics

__all__ = ["Correlation", "correlate"]


def _candidates(obj: Object) -> np.ndarray:
    """Symbols that take part in rules 2-5: named functions, objects and typeless labels."""
    t = obj.stype
    ok = obj.defined & ((t == C.STT_FUNC) | (t == C.STT_OBJECT) | (t == C.STT_NOTYPE) | (t == C.STT_TLS))
    ok &= ~obj.is_prefix  # __pfx_fn is part of fn (model.PREFIX_NAMES), never correlated on its own
    idx = np.flatnonzero(ok)
    names = obj.sym_names
    return np.array([i for i in idx if names[i] and not is_local_label(names[i])
                     and not is_special_static(names[i])], dtype=np.int64)


def _referencers(obj: Object, wanted: set[int] | None = None) -> dict[int, frozenset[str]]:
    """Symbol → canonical names of the functions whose code references it (for static locals).

    With ``wanted``, only relocations that can reach those symbols are looked at (a numpy pre-filter:
    the symbol itself, its section's symbol, or a TOC slot)."""
    refs: dict[int, set[str]] = defaultdict(set)
    arch = arch_for(obj.elf.machine)
    rel, relsec, start = obj.all_relocs
    keep: np.ndarray | None = None
    if wanted is not None:
        w = np.fromiter(wanted, np.int64)
        wsecs = obj.shndx[w]
        secsyms = obj.section_symbol[wsecs[(wsecs > 0) & (wsecs < obj.nsec)]]
        tocs = [obj.section_symbol[i] for i, n in enumerate(obj.sec_names) if n in arch.toc_sections]
        targets = np.concatenate([w, secsyms[secsyms >= 0], np.array(tocs, np.int64)])
        keep = isin(rel["sym"].astype(np.int64), targets)
    for tgt in unique(relsec[keep]).tolist() if keep is not None else obj.elf.reloc_sections:
        owner = int(obj.section_owner[tgt]) if tgt < obj.nsec else -1
        if owner < 0 or not obj.is_text(tgt):
            continue
        fname = canonical(obj.sym_names[owner])
        r = obj.relocs(tgt)
        for s, a, t in zip(r["sym"].tolist(), r["addend"].tolist(), r["type"].tolist(), strict=True):
            if obj.stype[s] == C.STT_SECTION and obj.sec_names[int(obj.shndx[s])] in arch.toc_sections:
                # ppc64: code reaches data through a TOC slot; the slot's relocation names the static
                slot = obj.relocs(int(obj.shndx[s]))
                slot = slot[slot["offset"] == a]
                if not len(slot):
                    continue
                s, a, t = int(slot["sym"][0]), int(slot["addend"][0]), int(slot["type"][0])
            if obj.stype[s] == C.STT_SECTION:  # statics outside -fdata-sections: .bss + offset
                s = obj.symbol_at(int(obj.shndx[s]), a + arch.pcrel_bias.get(t, 0))
                if s < 0:
                    continue
            refs[int(s)].add(fname)
    return {k: frozenset(v) for k, v in refs.items()}


def _code_digest(obj: Object, i: int) -> tuple[object, ...]:
    """A comparable summary of function ``i``: its bytes and relocation targets by canonical name."""
    sec = int(obj.shndx[i])
    lo, hi = obj.sym_range(i)
    r = obj.relocs(sec)
    r = r[(r["offset"] >= lo) & (r["offset"] < hi)]
    names = tuple((int(x["offset"]) - lo, int(x["type"]), obj.canon[int(x["sym"])], int(x["addend"]))
                  for x in r)
    return (obj.section_data(sec)[lo:hi], names)


def correlate(orig: Object, patched: Object) -> Correlation:
    """Pair the symbols and sections of ``orig`` and ``patched`` (see the module docstring)."""
    corr = Correlation(orig, patched,
                       np.full(orig.nsym, -1, np.int64), np.full(patched.nsym, -1, np.int64),
                       np.full(orig.nsec, -1, np.int64), np.full(patched.nsec, -1, np.int64))
    pair(corr, 0, 0, "null symbol")

    # Rule 1: FILE symbols in order, undefined symbols by name.
    of = [i for i in np.flatnonzero(orig.stype == C.STT_FILE)]
    pf = [i for i in np.flatnonzero(patched.stype == C.STT_FILE)]
    pf_by_name: dict[str, list[int]] = defaultdict(list)
    for i in pf:
        pf_by_name[patched.sym_names[i]].append(int(i))
    for i in of:
        lst = pf_by_name.get(orig.sym_names[i])
        if lst:
            pair(corr, int(i), lst.pop(0), "same source file")
    pund = {patched.sym_names[i]: int(i) for i in np.flatnonzero(~patched.defined) if i
            and patched.stype[i] != C.STT_FILE and patched.shndx[i] == C.SHN_UNDEF}
    for i in np.flatnonzero(~orig.defined):
        if i and orig.shndx[i] == C.SHN_UNDEF and orig.stype[i] != C.STT_FILE:
            p = pund.get(orig.sym_names[i])
            if p is not None:
                pair(corr, int(i), p, "same external symbol")

    oc, pc = _candidates(orig), _candidates(patched)
    corr.never = set(int(i) for i in np.flatnonzero(patched.defined)) - set(pc.tolist())

    # Rule 2: globals by exact name.
    pglob = {patched.sym_names[i]: int(i) for i in pc if patched.sbind[i] != C.STB_LOCAL}
    for i in oc:
        if orig.sbind[i] != C.STB_LOCAL:
            p = pglob.get(orig.sym_names[i])
            if p is not None and patched.stype[p] == orig.stype[i]:
                pair(corr, int(i), p, "same global name")

    # Rule 3/4: locals grouped by (scope file, canonical name, type).
    def groups(obj: Object, cand: np.ndarray, taken: np.ndarray) -> dict[tuple[str, str, int], list[int]]:
        g: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for i in cand:
            if taken[i] >= 0 or obj.sbind[i] != C.STB_LOCAL:
                continue
            sc = int(obj.scope[i])
            g[(obj.file_names[sc] if sc >= 0 else "", obj.canon[i], int(obj.stype[i]))].append(int(i))
        return g

    og, pg = groups(orig, oc, corr.o2p), groups(patched, pc, corr.p2o)
    oref: dict[int, frozenset[str]] | None = None
    pref: dict[int, frozenset[str]] | None = None
    # static locals that share a canonical name: only their references need looking at
    amb_o = {i for k, v in og.items() if k[2] == C.STT_OBJECT and (len(v) > 1 or len(pg.get(k, [])) > 1) for i in v}
    amb_p = {i for k, v in pg.items() if k[2] == C.STT_OBJECT and (len(v) > 1 or len(og.get(k, [])) > 1) for i in v}
    deferred: list[tuple[list[int], list[int]]] = []
    for key, olist in og.items():
        plist = pg.get(key)
        if not plist:
            continue
        if any(is_static_local(orig, i) for i in olist) or any(is_static_local(patched, i) for i in plist):
            # function-scope statics pair through their users once the functions are paired
            _match_by(corr, olist, plist, lambda o: orig.sym_names[o] if orig.sym_names[o] == orig.canon[o]
                      else None, lambda p: patched.sym_names[p] if patched.sym_names[p] == patched.canon[p]
                      else None, "same local name")
            deferred.append((olist, plist))
            continue
        if len(olist) == 1 and len(plist) == 1:
            o, p = olist[0], plist[0]
            same = orig.sym_names[o] == patched.sym_names[p]
            pair(corr, o, p, "same local name" if same else "same name up to GCC clone number")
            continue
        if key[2] == C.STT_OBJECT:
            if oref is None:
                oref, pref = _referencers(orig, amb_o), _referencers(patched, amb_p)
            assert pref is not None
            _match_by(corr, olist, plist, partial(_ref_key, oref), partial(_ref_key, pref),
                      "static local referenced by the same functions")
        else:
            _match_by(corr, olist, plist, lambda o: _code_digest(orig, o), lambda p: _code_digest(patched, p),
                      "same code (several clones share the name)")
        _match_by(corr, olist, plist, lambda o: orig.sym_names[o], lambda p: patched.sym_names[p],
                  "same local name")
        rest_o = [o for o in olist if corr.o2p[o] < 0]
        rest_p = [p for p in plist if corr.p2o[p] < 0]
        for o, p in zip(rest_o, rest_p, strict=False):
            pair(corr, o, p, "same canonical name, matched by position")

    # Rule 5: binding changed.
    def by_canon(obj: Object, cand: np.ndarray, taken: np.ndarray) -> dict[tuple[str, int], list[int]]:
        g: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i in cand:
            if taken[i] < 0:
                g[(obj.canon[i], int(obj.stype[i]))].append(int(i))
        return g

    ob, pb = by_canon(orig, oc, corr.o2p), by_canon(patched, pc, corr.p2o)
    for ckey, olist in ob.items():
        plist = pb.get(ckey)
        if plist and len(olist) == 1 and len(plist) == 1 and not is_static_local(orig, olist[0]) \
                and not is_static_local(patched, plist[0]):
            pair(corr, olist[0], plist[0], "same name, binding changed")

    corr.ambiguous = pair_statics(corr, deferred)

    _correlate_sections(corr)
    return corr


def _ref_key(refs: dict[int, frozenset[str]], i: int) -> frozenset[str] | None:
    return refs.get(i, frozenset()) or None


def _by_key(members: list[int], taken: np.ndarray, key: Callable[[int], object]) -> dict[object, list[int]]:
    """Still-unpaired ``members`` grouped by ``key`` (None: no key, left out)."""
    out: dict[object, list[int]] = defaultdict(list)
    for i in members:
        if taken[i] < 0:
            k = key(i)
            if k is not None:
                out[k].append(i)
    return out


def _match_by(corr: Correlation, olist: list[int], plist: list[int], okey: Callable[[int], object],
              pkey: Callable[[int], object], why: str) -> None:
    """Pair the still-free members of ``olist``/``plist`` whose keys are equal and unique on both sides."""
    okeys = _by_key(olist, corr.o2p, okey)
    pkeys = _by_key(plist, corr.p2o, pkey)
    for k, os_ in okeys.items():
        ps = pkeys.get(k)
        if ps and len(os_) == 1 and len(ps) == 1:
            pair(corr, os_[0], ps[0], why)


def _correlate_sections(corr: Correlation) -> None:
    o, p = corr.orig, corr.patched
    # Sections holding a correlated function/object follow it (vectorised: one per section pair).
    own = o.section_owner
    twin = np.where(own >= 0, corr.o2p[np.clip(own, 0, None)], -1)
    secs = np.flatnonzero(twin >= 0)
    secs = secs[secs > 0]
    if len(secs):
        psecs = p.shndx[twin[secs]]
        good = (psecs > 0) & (psecs < p.nsec)
        secs, psecs = secs[good], psecs[good]
        good = p.section_owner[psecs] == twin[secs]
        secs, psecs = secs[good], psecs[good]
        _, first = np.unique(psecs, return_index=True)
        secs, psecs = secs[first], psecs[first]
        corr.so2p[secs], corr.sp2o[psecs] = psecs, secs
    # The rest by name, with GCC numbering removed from the name's symbol part.
    def key(obj: Object, sec: int) -> str:
        n = obj.sec_names[sec]
        subj = section_subject(n)
        return n[: len(n) - len(subj)] + canonical(subj) if subj else canonical(n) if ".str1." in n else n

    pk: dict[str, list[int]] = defaultdict(list)
    for sec in np.flatnonzero((corr.sp2o < 0) & (p.section_owner < 0)).tolist():
        if sec:
            pk[key(p, sec)].append(sec)
    ok: dict[str, list[int]] = defaultdict(list)
    for sec in np.flatnonzero((corr.so2p < 0) & (o.section_owner < 0)).tolist():
        if sec:
            ok[key(o, sec)].append(sec)
    for k, olist in ok.items():
        plist = pk.get(k)
        if plist and len(olist) == len(plist):
            for a, b in zip(olist, plist, strict=True):
                corr.so2p[a], corr.sp2o[b] = b, a
    # Section symbols follow their sections.
    for sec in range(1, o.nsec):
        ps = int(corr.so2p[sec])
        if ps >= 0 and o.section_symbol[sec] >= 0 and p.section_symbol[ps] >= 0:
            pair(corr, int(o.section_symbol[sec]), int(p.section_symbol[ps]), "section symbol")
