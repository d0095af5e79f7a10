"""The *compare* stage: decide, per function and data object, whether the patch changed it.

Two symbols are the same when their bytes are equal and their relocations agree entry by entry on
offset, type, addend and *what* they point at: a correlated symbol (never a raw index or displacement),
a string by its content, an anonymous table by its content, or a special static by its kind.
A function whose bytes differ only in immediates that reach the line argument of a line-taking call
at that call (a moved ``__LINE__``, klpforge/diff/lineargs.py) is the same; capstone decodes the instructions.

>>> cmp = compare(corr, arch_for(62))
>>> cmp.status["meminfo_proc_show"]
'changed'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..elf import constants as C
from .arch import Arch
from .correlation import Correlation
from .dwarfread import clone_line_regs
from .lineargs import LINE_ARGS, only_lines_differ
from .model import Object, is_ignored_section
from .names import is_special_static
from .reloc_keys import TargetKeys
from .sharedsec import is_shared, resolved_mismatch, same_but_relaxed, same_but_resolved

__all__ = ["Comparison", "compare", "TargetKeys", "LINE_ARGS"]

SAME, CHANGED, NEW = "same", "changed", "new"

@dataclass
class Comparison:
    """Per-symbol verdicts, keyed by patched symbol index (and orig index for removed ones)."""

    status: dict[int, str] = field(default_factory=dict)  # patched symbol -> same/changed/new
    why: dict[int, str] = field(default_factory=dict)
    line_only: set[int] = field(default_factory=set)  # patched symbols whose only change is __LINE__
    removed: list[int] = field(default_factory=list)  # orig function/object symbols with no twin
    changed_sections: dict[int, str] = field(default_factory=dict)  # patched section -> why (unowned)
    keys: TargetKeys | None = None


def _reloc_slice(obj: Object, keys: TargetKeys, sec: int, lo: int, hi: int) -> np.ndarray:
    """Rows (offset - lo, type, key id, addend) of the relocations in ``[lo, hi)`` of ``sec``."""
    off, typ, kid, add = keys.section_keys(obj, sec)
    a, b = np.searchsorted(off, [lo, hi])
    return np.stack([off[a:b] - lo, typ[a:b], kid[a:b], add[a:b]], axis=1) if b > a else np.zeros((0, 4), np.int64)


def _same_relocs(o: Object, p: Object, keys: TargetKeys, osec: int, psec: int, olo: int, ohi: int, plo: int,
                 phi: int) -> bool:
    """Do the two ranges' relocations agree entry by entry? (no array built on the common path)"""
    oo, ot, ok, oa = keys.section_keys(o, osec)
    po, pt, pk, pa = keys.section_keys(p, psec)
    a1, b1 = (0, len(oo)) if olo == 0 and ohi >= int(o.shdrs["size"][osec]) else np.searchsorted(oo, [olo, ohi])
    a2, b2 = (0, len(po)) if plo == 0 and phi >= int(p.shdrs["size"][psec]) else np.searchsorted(po, [plo, phi])
    if b1 - a1 != b2 - a2:
        return False
    if b1 == a1:
        return True
    return (np.array_equal(ok[a1:b1], pk[a2:b2]) and np.array_equal(oa[a1:b1], pa[a2:b2])
            and np.array_equal(ot[a1:b1], pt[a2:b2]) and np.array_equal(oo[a1:b1] - olo, po[a2:b2] - plo))


def _reloc_tuples(obj: Object, keys: TargetKeys, sec: int, lo: int, hi: int) -> list[tuple[object, ...]]:
    return [(int(o_), int(t), keys.key_of(int(k)), int(a)) for o_, t, k, a in _reloc_slice(obj, keys, sec, lo, hi)]


def _describe(name_of: Callable[[int], str], t: tuple[object, ...]) -> str:
    what = t[2]
    if isinstance(what, tuple):
        kind = what[0]
        if kind == "sym":
            return name_of(int(what[1]))
        if kind == "str":
            return repr(bytes(what[1]).decode(errors="replace")[:40])
        if kind in ("table", "anon", "label"):
            return {"table": "a switch table (CSWTCH)", "anon": "anonymous data",
                    "label": "a local label"}[str(kind)] + f" #{str(what[1])[:8]}"
        return f"{kind} {what[1]}"
    return str(what)


def compare(corr: Correlation, arch: Arch, quick: bool = True) -> Comparison:
    """Compare every correlated function and object; mark uncorrelated patched ones new.

    ``quick`` settles the (common) identical pairs in bulk by digest; off, every pair is compared
    entry by entry (the tests check that both agree)."""
    o, p = corr.orig, corr.patched
    keys = TargetKeys(corr, arch)
    res = Comparison(keys=keys)
    want = (C.STT_FUNC, C.STT_OBJECT)
    cand = [pi for pi in range(p.nsym) if p.defined[pi] and p.stype[pi] in want and not p.is_prefix[pi]
            and not is_ignored_section(p.sec_names[int(p.shndx[pi])])]
    pairs = [(pi, int(corr.p2o[pi])) for pi in cand if corr.p2o[pi] >= 0]
    quick_same = _quick_same(o, p, keys, pairs) if quick else set()
    for pi in cand:
        psec = int(p.shndx[pi])
        oi = int(corr.p2o[pi])
        if oi < 0:
            res.status[pi] = NEW
            res.why[pi] = "new in the patched object"
            continue
        osec = int(o.shndx[oi])
        olo, ohi = o.sym_range(oi)
        plo, phi = p.sym_range(pi)
        why = None if pi in quick_same else _differs(o, p, keys, osec, psec, olo, ohi, plo, phi)
        if why is None and p.is_text(psec) and osec in o.syms_in_section and is_shared(p, arch, psec):
            # equal bytes in a shared .text: a resolved call may still reach another function now
            why = resolved_mismatch(o, p, corr.p2o, arch, osec, psec, (olo, ohi), (plo, phi))
            if why is not None:
                res.status[pi] = CHANGED
                res.why[pi] = why
                continue
        if why is None:
            res.status[pi] = SAME
            continue
        if why == "bytes" and p.is_text(psec) and osec in o.syms_in_section and is_shared(p, arch, psec) \
                and same_but_resolved(o, p, corr.o2p, arch, osec, psec, olo, ohi, plo, phi):
            res.status[pi] = SAME  # only calls into moved neighbours of its shared section differ
            continue
        if p.is_text(psec) and osec in o.syms_in_section and is_shared(p, arch, psec) \
                and same_but_relaxed(o, p, corr.o2p, arch, osec, psec, (olo, ohi), (plo, phi),
                                     _reloc_slice(o, keys, osec, olo, ohi), _reloc_slice(p, keys, psec, plo, phi)):
            res.status[pi] = SAME  # a jump to a moved neighbour took another length (branch relaxation)
            continue
        if why == "bytes" and p.is_text(psec):
            if _line_only(o, p, keys, osec, psec, olo, ohi, plo, phi):
                res.status[pi] = SAME
                res.line_only.add(pi)
                res.why[pi] = "only __LINE__ arguments of WARN/printk-style calls moved (ignored)"
                continue
            why = "code differs"
        res.status[pi] = CHANGED
        res.why[pi] = why
    for oi in range(o.nsym):
        if o.defined[oi] and o.stype[oi] in want and corr.o2p[oi] < 0 and not o.is_prefix[oi] \
                and not is_ignored_section(o.sec_names[int(o.shndx[oi])]):
            res.removed.append(oi)
    _compare_unowned(corr, keys, res)
    return res


def _quick_same(o: Object, p: Object, keys: TargetKeys, pairs: list[tuple[int, int]]) -> set[int]:
    """Patched symbols of ``pairs`` whose size, relocation digest and bytes all equal their twin's: the
    common case, decided with whole-object numpy work and one bytes compare each."""
    if not pairs:
        return set()
    pi = np.array([x for x, _ in pairs], np.int64)
    oi = np.array([y for _, y in pairs], np.int64)
    olo, ohi = o.sym_ranges(oi)
    plo, phi = p.sym_ranges(pi)
    ok = (ohi - olo) == (phi - plo)
    ok &= keys.reloc_digests(o, oi, olo, ohi) == keys.reloc_digests(p, pi, plo, phi)
    onob = o.shdrs["type"][o.shndx[oi]] == C.SHT_NOBITS
    pnob = p.shdrs["type"][p.shndx[pi]] == C.SHT_NOBITS
    ok &= onob == pnob
    out = set()
    for k in np.flatnonzero(ok).tolist():
        # views of the mapped files: comparing 100k functions must not copy (and cache) every section
        if onob[k] or o.elf.section_view(int(o.shndx[oi[k]]))[olo[k]:ohi[k]] == \
                p.elf.section_view(int(p.shndx[pi[k]]))[plo[k]:phi[k]]:
            out.add(int(pi[k]))
    return out


def _differs(o: Object, p: Object, keys: TargetKeys, osec: int, psec: int,
             olo: int, ohi: int, plo: int, phi: int) -> str | None:
    """None when equal, else a short reason ('bytes' when only the bytes differ)."""
    if ohi - olo != phi - plo:
        return f"size {ohi - olo} -> {phi - plo}"
    if not _same_relocs(o, p, keys, osec, psec, olo, ohi, plo, phi):
        ot = _reloc_tuples(o, keys, osec, olo, ohi)
        pt = _reloc_tuples(p, keys, psec, plo, phi)
        if len(ot) != len(pt):
            return f"{len(ot)} -> {len(pt)} relocations"
        for a, b in zip(ot, pt, strict=True):
            if a != b:
                ka, kb = a[2], b[2]
                if isinstance(ka, tuple) and isinstance(kb, tuple) and ka[0] == kb[0] == "table":
                    return f"the switch table (CSWTCH) it uses at +{b[0]:#x} has new contents"
                return (f"reference at +{b[0]:#x} changed: {_describe(lambda i: o.sym_names[i], a)} -> "
                        f"{_describe(lambda i: o.sym_names[i], b)}")
    onob = o.shdrs["type"][osec] == C.SHT_NOBITS
    pnob = p.shdrs["type"][psec] == C.SHT_NOBITS
    if onob != pnob:
        return "moved between initialised and zero-initialised data"
    if onob:
        return None
    if o.section_data(osec)[olo:ohi] != p.section_data(psec)[plo:phi]:
        return "bytes"
    return None


def _line_relocs(obj: Object, keys: TargetKeys, sec: int, lo: int, hi: int) -> list[tuple[int, str, bytes | None]]:
    """(offset - lo, callee name or '', the string the target addresses) for the relocations of
    ``[lo, hi)``: what :func:`klpforge.diff.lineargs.line_loads` needs.

    The callee is named for an undefined target, and for a function of the same object when the object
    is profiled (:func:`is_profiled`): GCC turns ``-fipa-ra`` off under ``-pg`` ("the option is disabled
    if generated code will be instrumented for profiling", GCC 12 manual, Optimize Options), so calls to
    it follow the standard ABI (6.1's ``__ext4_error``, ``__ext4_msg`` are defined in ``fs/ext4/super.c``
    itself). GCC clones (``foo.isra.0``: arguments removed or reordered) are named only when their DWARF
    says in which register the line arrives (:func:`_clone_regs`)."""
    r = obj.relocs(sec)
    r = r[(r["offset"] >= lo) & (r["offset"] < hi)]
    arch = keys.arch
    local_ok = is_profiled(obj, arch)
    clones = _clone_regs(obj, arch) if local_ok else {}
    out: list[tuple[int, str, bytes | None]] = []
    for off, sym, typ, add in zip(r["offset"].tolist(), r["sym"].tolist(), r["type"].tolist(), r["addend"].tolist(),
                                  strict=True):
        callee = obj.sym_names[sym] if not obj.defined[sym] and obj.stype[sym] != C.STT_SECTION else ""
        if not callee and local_ok and obj.defined[sym]:
            callee = _local_callee(obj, arch, int(sym), int(typ), int(add), clones)
        s = None
        if not callee:
            k, a = keys.key(obj, int(sym), int(typ), int(add))
            s = _string_of(k, a + keys.arch.pcrel_bias.get(int(typ), 0))
        out.append((int(off) - lo, callee, s))
    return out


def is_profiled(obj: Object, arch: Arch) -> bool:
    """True when ``obj`` was compiled with ``-pg`` (it calls the profiling hook ``__fentry__``/``_mcount``
    by name; ``-fpatchable-function-entry`` objects do not, and keep ``-fipa-ra``)."""
    names = set(arch.fentry_names)
    return any(not obj.defined[i] and obj.sym_names[i] in names for i in range(1, obj.nsym))


def _local_callee(obj: Object, arch: Arch, sym: int, typ: int, add: int, clones: dict[str, str]) -> str:
    """Name of the function of ``obj`` a call relocation enters at its start ('' for anything else: data,
    the middle of a function, a GCC clone unless ``clones`` knows where its line argument arrives)."""
    where = add + arch.pcrel_bias.get(typ, 0)
    if obj.stype[sym] == C.STT_SECTION:
        t = obj.symbol_at(int(obj.shndx[sym]), where)
        if t < 0 or int(obj.value[t]) != where:
            return ""
    elif where != 0:
        return ""
    else:
        t = sym
    name = obj.sym_names[t]
    return name if obj.stype[t] == C.STT_FUNC and ("." not in name or name in clones) else ""


def _string_of(k: object, rel: int) -> bytes | None:
    """The string literal a relocation key addresses at its start, looking through TOC slots."""
    if isinstance(k, tuple) and k:
        if k[0] == "str" and rel == 0 and isinstance(k[1], bytes):
            return k[1]
        if k[0] == "toc" and len(k) >= 4:
            return _string_of(k[2], int(k[3]))
    return None


def _line_only(o: Object, p: Object, keys: TargetKeys, osec: int, psec: int, olo: int, ohi: int, plo: int,
               phi: int) -> bool:
    """True when every differing instruction loads an immediate that reaches the ``__LINE__`` argument of
    a line-taking call (klpforge/diff/lineargs.py), in both objects."""
    arch = keys.arch
    if not arch.cs_arch:
        return False
    return only_lines_differ(arch, o.section_data(osec)[olo:ohi], _line_relocs(o, keys, osec, olo, ohi),
                             p.section_data(psec)[plo:phi], _line_relocs(p, keys, psec, plo, phi),
                             _clone_regs(o, arch), _clone_regs(p, arch))


def _clone_regs(obj: Object, arch: Arch) -> dict[str, str]:
    """Line registers of the object's clones of line-taking helpers, from DWARF, in a profiled object
    only (klpforge/diff/dwarfread.py ``clone_line_regs``; empty otherwise: such a call then counts)."""
    if not is_profiled(obj, arch):
        return {}
    return clone_line_regs(obj, LINE_ARGS)


def _compare_unowned(corr: Correlation, keys: TargetKeys, res: Comparison) -> None:
    """Sections holding no function/object symbol (anonymous tables, string literals): by content."""
    o, p = corr.orig, corr.patched
    for ps in range(1, p.nsec):
        name = p.sec_names[ps]
        t = int(p.shdrs["type"][ps])
        if t not in (C.SHT_PROGBITS, C.SHT_NOBITS, C.SHT_INIT_ARRAY, C.SHT_FINI_ARRAY) \
                or not p.section_flags(ps) & C.SHF_ALLOC or is_ignored_section(name):
            continue
        if ps in p.syms_in_section:
            continue
        osec = int(corr.sp2o[ps])
        if osec < 0:
            if int(p.shdrs["size"][ps]):
                res.changed_sections[ps] = "new section"
            continue
        if p.section_flags(ps) & C.SHF_STRINGS or name in keys.arch.toc_sections or is_special_static(name):
            continue  # string literals and TOC slots are compared where they are used, by content
        a = _reloc_tuples(o, keys, osec, 0, int(o.shdrs["size"][osec]))
        b = _reloc_tuples(p, keys, ps, 0, int(p.shdrs["size"][ps]))
        if a != b or o.section_data(osec) != p.section_data(ps):
            res.changed_sections[ps] = "content differs"
