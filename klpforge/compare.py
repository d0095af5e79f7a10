"""The *compare* stage: decide, per function and data object, whether the patch changed it.

Two symbols are the same when their bytes are equal and their relocations agree entry by entry on
offset, type, addend and *what* they point at: a correlated symbol (never a raw index or displacement),
a string by its content, an anonymous table by its content, or a special static by its kind.
A function whose bytes differ only in immediates loaded into the argument registers of a
WARN/printk-style call (a moved ``__LINE__``) is the same; capstone decodes the instructions.

>>> cmp = compare(corr, arch_for(62))
>>> cmp.status["meminfo_proc_show"]
'changed'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .arch import Arch
from .correlate import Correlation
from .elf import constants as C
from .model import Object, is_ignored_section
from .names import is_local_label, is_special_static, special_kind

__all__ = ["Comparison", "compare", "TargetKeys", "LINE_HELPERS"]

SAME, CHANGED, NEW = "same", "changed", "new"
#: Key ids at or above this stand for a correlated symbol (``SYM_BASE + orig index``), below for interned keys.
SYM_BASE = 1 << 40

#: Calls that take ``__LINE__`` as an argument (kernel 6.1 ``include/asm-generic/bug.h``,
#: ``include/linux/kernel.h``, ``include/linux/printk.h``, ``include/linux/rcupdate.h``).
LINE_HELPERS = ("__warn_printk", "warn_slowpath_fmt", "warn_slowpath_null", "__might_sleep", "__might_fault",
                "__might_resched", "printk", "_printk", "lockdep_rcu_suspicious", "__btrfs_handle_fs_error",
                "btrfs_error", "__btrfs_abort_transaction", "__btrfs_panic", "___might_sleep",
                "__cant_sleep", "__cant_migrate", "rcu_read_lock_held_common")


class TargetKeys:
    """Comparable keys for what a relocation points at, shared by both objects of a correlation."""

    def __init__(self, corr: Correlation, arch: Arch):
        self.corr = corr
        self.arch = arch
        self._starts_cache: dict[int, dict[int, np.ndarray]] = {}
        self._toc_cache: dict[tuple[int, int, int], tuple[object, ...]] = {}
        self._anon: dict[tuple[int, int], str] = {}
        self._ids: dict[object, int] = {}
        self.by_id: list[object] = []
        self._sid: dict[int, np.ndarray] = {}
        self._sid[id(corr.orig)] = self._sym_ids(corr.orig, True)
        self._sid[id(corr.patched)] = self._sym_ids(corr.patched, False)
        self._seckeys: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def intern(self, k: object) -> int:
        """A small integer standing for key ``k`` (equal keys, equal ids, in both objects)."""
        i = self._ids.get(k)
        if i is None:
            i = self._ids[k] = len(self.by_id)
            self.by_id.append(k)
        return i

    def section_keys(self, obj: Object, sec: int) -> tuple[np.ndarray, ...]:
        """(offset, type, key id, addend relative to the key) for every relocation of ``sec``."""
        off, typ, kid, add = self.object_keys(obj)
        start = obj.all_relocs[2]
        a, b = int(start[sec]), int(start[sec + 1])
        return off[a:b], typ[a:b], kid[a:b], add[a:b]

    def object_keys(self, obj: Object) -> tuple[np.ndarray, ...]:
        """:meth:`section_keys` for the whole object at once, cached: named targets are looked up as a
        vector, section-symbol targets in bulk where simple; only the rest take a Python call each."""
        ck = (id(obj), -1)
        c = self._seckeys.get(ck)
        if c is None:
            r = obj.all_relocs[0]
            syms = r["sym"].astype(np.int64)
            kid = self._sid[id(obj)][syms] if len(r) else np.zeros(0, np.int64)
            add = r["addend"].astype(np.int64)
            todo = np.flatnonzero(kid < 0)
            if len(todo):
                todo = self._vector_section_refs(obj, r, syms, kid, add, todo)
            for j in todo.tolist():
                k, a = self.key(obj, int(syms[j]), int(r["type"][j]), int(add[j]))
                kid[j] = self.intern(k)
                add[j] = a
            c = self._seckeys[ck] = (r["offset"].astype(np.int64), r["type"].astype(np.int64), kid, add)
        return c

    def _sym_ids(self, obj: Object, is_orig: bool) -> np.ndarray:
        """Key id of every symbol: correlated ones are ``SYM_BASE + orig index`` (no Python object each),
        section symbols -1 (resolved per relocation), the rest interned from :meth:`_other_key`."""
        m = self.corr.o2p if is_orig else self.corr.p2o
        n = obj.nsym
        sid = np.full(n, -1, np.int64)
        corr_ok = obj.defined & (m[:n] >= 0) & (obj.stype != C.STT_SECTION)
        sid[corr_ok] = SYM_BASE + (np.arange(n) if is_orig else m[:n])[corr_ok]
        rest = np.flatnonzero(~corr_ok & (obj.stype != C.STT_SECTION))
        for i in rest.tolist():
            sid[i] = self.intern(self._other_key(obj, i, m, is_orig))
        return sid

    def _other_key(self, obj: Object, i: int, m: np.ndarray, is_orig: bool) -> object:
        name = obj.sym_names[i]
        if not obj.defined[i]:
            return ("ext", name)
        if name.startswith("CSWTCH"):  # a switch table: what matters is its content
            return ("table", self.content_digest(obj, int(obj.shndx[i]), *obj.sym_range(i)))
        if is_special_static(name):
            return ("special", special_kind(name))
        if is_local_label(name):
            return self._label_key(obj, i, m, is_orig)
        return ("new" if not is_orig else "gone", name)

    def key_of(self, kid: int) -> object:
        """The key an id stands for."""
        return ("sym", kid - SYM_BASE) if kid >= SYM_BASE else self.by_id[kid]

    def symkey(self, obj: Object, i: int) -> object:
        """The key of symbol ``i`` of ``obj`` (None for a section symbol)."""
        kid = int(self._sid[id(obj)][i])
        return None if kid < 0 else self.key_of(kid)

    def _label_key(self, obj: Object, i: int, m: np.ndarray, is_orig: bool) -> object:
        """Key of an assembler label: the string it starts, the function and offset it marks in code
        (gcc emits thousands of ``.LVL``/``.LBB`` labels per object on loongarch64/aarch64), or the bytes
        from it to the next symbol in data."""
        sec, v = int(obj.shndx[i]), int(obj.value[i])
        if obj.section_flags(sec) & C.SHF_STRINGS:
            data = obj.section_data(sec)
            end = data.find(b"\0", v)
            return ("str", data[v:end if end >= 0 else len(data)])
        if obj.is_text(sec):
            f = obj.symbol_at(sec, v)
            if f < 0 or obj.stype[f] != C.STT_FUNC:
                return ("aux", obj.sec_names[sec], v)
            fk = ("sym", f if is_orig else int(m[f])) if m[f] >= 0 else ("new" if not is_orig else "gone",
                                                                          obj.sym_names[f])
            return ("codelabel", fk, v - int(obj.value[f]))
        if int(obj.size[i]):
            return ("label", self.content_digest(obj, sec, *obj.sym_range(i)))
        starts = self._starts(obj).get(sec)
        nxt = starts[np.searchsorted(starts, v, side="right")] if starts is not None and starts[-1] > v else None
        return ("label", self.content_digest(obj, sec, v, int(obj.shdrs["size"][sec]) if nxt is None else int(nxt)))

    def _starts(self, obj: Object) -> dict[int, np.ndarray]:
        """Per section, the sorted start offsets of the symbols defined in it (cached per object)."""
        c = self._starts_cache.get(id(obj))
        if c is None:
            named = np.flatnonzero(obj.defined & (obj.stype != C.STT_SECTION))
            order = named[np.lexsort((obj.value[named], obj.shndx[named]))]
            secs = obj.shndx[order]
            cut = np.flatnonzero(np.diff(secs)) + 1
            c = {int(g[0]): np.unique(obj.value[o]) for g, o in zip(np.split(secs, cut), np.split(order, cut),
                                                                      strict=True) if len(g)}
            self._starts_cache[id(obj)] = c
        return c

    def content_digest(self, obj: Object, sec: int, lo: int, hi: int) -> str:
        """Digest of a byte range and the *names* its relocations point at (for unnamed data)."""
        h = hashlib.blake2b(digest_size=16)
        if obj.shdrs["type"][sec] != C.SHT_NOBITS:
            h.update(obj.section_data(sec)[lo:hi])
        else:
            h.update(str(hi - lo).encode())
        r = obj.relocs(sec)
        r = r[(r["offset"] >= lo) & (r["offset"] < hi)]
        for x in r:
            s = int(x["sym"])
            tgt = obj.sym_names[s] if obj.stype[s] != C.STT_SECTION else obj.sec_names[int(obj.shndx[s])]
            h.update(f"{int(x['offset']) - lo}:{int(x['type'])}:{tgt}:{int(x['addend'])};".encode())
        return h.hexdigest()

    def toc_key(self, obj: Object, sec: int, off: int) -> tuple[object, ...]:
        """What the TOC slot at ``sec+off`` holds: the target of its relocation, else its bytes (a
        constant). Slots are numbered per object, so their offsets never count."""
        ck = (id(obj), sec, off)
        k = self._toc_cache.get(ck)  # each slot is reached by an @ha/@l pair, often from many functions
        if k is None:
            r = obj.relocs(sec)
            a, b = np.searchsorted(r["offset"], [off, off + 1])
            if b > a:
                x = r[a]
                k = ("toc", int(x["type"]), *self.key(obj, int(x["sym"]), int(x["type"]), int(x["addend"])))
            else:
                k = ("tocval", obj.section_data(sec)[off:off + 8])
            self._toc_cache[ck] = k
        return k

    def reloc_digests(self, obj: Object, syms: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """A 64-bit digest per symbol of its relocations (offset relative to ``lo``, type, target key,
        addend), for all ``syms`` at once: prefix sums over the object's sorted relocation table.

        Equal relocation lists give equal digests; different lists differ except with ~2^-64 odds.
        The digest is linear in the offset, so ``sum(h * (off - lo + 1))`` comes from two prefix sums."""
        off, typ, kid, add = self.object_keys(obj)
        rel, relsec, _ = obj.all_relocs
        with np.errstate(over="ignore"):
            u = np.uint64
            h = (typ.astype(u) * u(0x9E3779B97F4A7C15)) ^ (kid.astype(u) * u(0xC2B2AE3D27D4EB4F)) \
                ^ (add.astype(u) * u(0x165667B19E3779F9))
            h ^= h >> u(29)
            h *= u(0xBF58476D1CE4E5B9)
            h ^= h >> u(32)
            sh = np.concatenate([[u(0)], np.cumsum(h, dtype=u)])
            sho = np.concatenate([[u(0)], np.cumsum(h * off.astype(u), dtype=u)])
            gkey = relsec.astype(np.int64) * (1 << 40) + off
            sec = obj.shndx[syms].astype(np.int64)
            a = np.searchsorted(gkey, sec * (1 << 40) + lo)
            b = np.searchsorted(gkey, sec * (1 << 40) + hi)
            s1 = sh[b] - sh[a]
            s2 = sho[b] - sho[a]
            return s2 - (lo.astype(u) - u(1)) * s1 + (b - a).astype(u) * u(0x94D049BB133111EB)

    def _vector_section_refs(self, obj: Object, r: np.ndarray, syms: np.ndarray, kid: np.ndarray, add: np.ndarray,
                             todo: np.ndarray) -> np.ndarray:
        """Resolve section-symbol references in bulk where that is simple: into a -ffunction-sections /
        -fdata-sections section (its one symbol) and into string-literal sections (by content).
        Fills ``kid``/``add`` in place and returns the entries left for :meth:`key`."""
        tsec = obj.shndx[syms[todo]]
        single = obj.single_symbol
        m = single[np.clip(tsec, 0, len(single) - 1)]
        m[(tsec <= 0) | (tsec >= len(single))] = -1
        hit = m >= 0
        j = todo[hit]
        kid[j] = self._sid[id(obj)][m[hit]]
        add[j] = add[j] - obj.value[m[hit]]
        rest = todo[~hit]
        rsec = obj.shndx[syms[rest]]
        # string sections, but not those named like a special static (key() treats those as special first)
        is_str = ((obj.shdrs["flags"].astype(np.int64) & C.SHF_STRINGS) != 0) & ~obj.special_named_sections
        strs = (rsec > 0) & (rsec < obj.nsec) & is_str[np.clip(rsec, 0, obj.nsec - 1)]
        sj = rest[strs]
        if len(sj):
            bias_of = np.zeros(max(int(r["type"].max()) + 1, 1), np.int64)
            for t, b in self.arch.pcrel_bias.items():
                if t < len(bias_of):
                    bias_of[t] = b
            # All string sections laid end to end: one searchsorted over every NUL finds each string.
            ssec = rsec[strs]
            uniq = np.unique(ssec)
            blobs = [obj.section_data(int(x)) for x in uniq.tolist()]
            sizes = np.array([len(b) for b in blobs], np.int64)
            base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            buf = b"".join(blobs)
            nul = np.flatnonzero(np.frombuffer(buf, np.uint8) == 0)
            g = np.searchsorted(uniq, ssec)
            lo, hi = base[g], base[g] + sizes[g]
            where = lo + np.clip(add[sj] + bias_of[r["type"][sj].astype(np.int64)], 0, None)
            k = np.searchsorted(nul, where, side="left")
            prev = np.where(k > 0, nul[np.clip(k - 1, 0, max(len(nul) - 1, 0))] + 1, 0) if len(nul) else lo
            nxt = np.where(k < len(nul), nul[np.clip(k, 0, max(len(nul) - 1, 0))], hi) if len(nul) else hi
            start, end = np.maximum(prev, lo), np.minimum(nxt, hi)
            for jj, st, en, b0 in zip(sj.tolist(), start.tolist(), end.tolist(), lo.tolist(), strict=True):
                kid[jj] = self.intern(("str", buf[st:en]))
                add[jj] = add[jj] - (st - b0)
        return self._vector_covering(obj, r, syms, kid, add, rest[~strs])

    def _vector_covering(self, obj: Object, r: np.ndarray, syms: np.ndarray, kid: np.ndarray, add: np.ndarray,
                         left: np.ndarray) -> np.ndarray:
        """References ``.text+off`` into sections holding many symbols (no -ffunction-sections): binary
        search per section for all of them at once; a place covered by exactly one symbol is settled
        here, anything else (no symbol, overlaps, special sections) is left for :meth:`key`."""
        if not len(left):
            return left
        lsec = obj.shndx[syms[left]]
        order = np.argsort(lsec, kind="stable")
        left, lsec = left[order], lsec[order]
        bias_of = np.zeros(max(int(r["type"].max()) + 1, 1), np.int64)
        for t, b in self.arch.pcrel_bias.items():
            if t < len(bias_of):
                bias_of[t] = b
        done = np.zeros(len(left), bool)
        bounds = np.flatnonzero(np.diff(lsec)) + 1
        sid = self._sid[id(obj)]
        for grp in np.split(np.arange(len(left)), bounds):
            sec = int(lsec[grp[0]])
            if not 0 < sec < obj.nsec or len(obj.syms_in_section.get(sec, ())) < 2:
                continue
            name = obj.sec_names[sec]
            if is_special_static(name) or name in self.arch.toc_sections:
                continue
            starts, ends, msyms, prev = obj.sorted_members(sec)
            j = left[grp]
            where = add[j] + bias_of[r["type"][j].astype(np.int64)]
            k = np.searchsorted(starts, where, side="right") - 1
            kk = np.clip(k, 0, None)
            ok = (k >= 0) & (ends[kk] > where) & (prev[kk] <= where)
            t = msyms[kk[ok]]
            kid[j[ok]] = sid[t]
            add[j[ok]] = add[j[ok]] - obj.value[t]
            done[grp[ok]] = True
        return left[~done]

    def key(self, obj: Object, sym: int, rtype: int, addend: int) -> tuple[object, int]:
        """(what, addend relative to it) for one relocation of ``obj``."""
        k = self.symkey(obj, sym)
        if k is not None:
            return k, addend
        sec = int(obj.shndx[sym])
        if sec == 0 or sec >= obj.nsec:
            return ("abs", obj.sym_names[sym]), addend
        bias = self.arch.pcrel_bias.get(rtype, 0)
        where = addend + bias
        name = obj.sec_names[sec]
        flags = obj.section_flags(sec)
        if is_special_static(name):  # a section of its own per use site (.data..Lubsan_data12)
            return ("special", special_kind(name)), addend
        if flags & C.SHF_STRINGS:
            data = obj.section_data(sec)
            start = data.rfind(b"\0", 0, max(where, 0)) + 1 if where > 0 else 0
            end = data.find(b"\0", max(where, 0))
            return ("str", data[start: end if end >= 0 else len(data)]), addend - start
        if name in self.arch.toc_sections:
            return self.toc_key(obj, sec, where), addend - where
        t = obj.symbol_at(sec, where)
        if t >= 0:
            return self.symkey(obj, t), addend - int(obj.value[t])
        if obj.is_text(sec):
            # Code outside any function (.altinstr_replacement, .fixup, .altinstr_aux) is compared through
            # the special-section entries that point at it; .altinstr_aux offsets shift with any edit.
            return ("aux", name), (0 if name == ".altinstr_aux" else addend)
        ak = self._anon.get((id(obj), sec))
        if ak is None:
            ak = self._anon[(id(obj), sec)] = self.content_digest(obj, sec, 0, int(obj.shdrs["size"][sec]))
        return ("anon", ak), addend


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
    helpers_cache: dict[int, bool] = {}
    cand = [pi for pi in range(p.nsym) if p.defined[pi] and p.stype[pi] in want
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
        if pi in quick_same:
            res.status[pi] = SAME
            continue
        osec = int(o.shndx[oi])
        olo, ohi = o.sym_range(oi)
        plo, phi = p.sym_range(pi)
        why = _differs(o, p, keys, oi, pi, osec, psec, olo, ohi, plo, phi)
        if why is None:
            res.status[pi] = SAME
            continue
        if why == "bytes" and p.is_text(psec):
            if _line_only(o, p, arch, osec, psec, olo, ohi, plo, phi, helpers_cache, pi):
                res.status[pi] = SAME
                res.line_only.add(pi)
                res.why[pi] = "only __LINE__ arguments of WARN/printk-style calls moved (ignored)"
                continue
            why = "code differs"
        res.status[pi] = CHANGED
        res.why[pi] = why
    for oi in range(o.nsym):
        if o.defined[oi] and o.stype[oi] in want and corr.o2p[oi] < 0 \
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


def _differs(o: Object, p: Object, keys: TargetKeys, oi: int, pi: int, osec: int, psec: int,
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


def _calls_line_helper(obj: Object, sec: int, lo: int, hi: int) -> bool:
    r = obj.relocs(sec)
    r = r[(r["offset"] >= lo) & (r["offset"] < hi)]
    return any(obj.sym_names[int(s)] in LINE_HELPERS or obj.sym_names[int(s)].startswith("__btrfs")
               for s in np.unique(r["sym"]))


def _line_only(o: Object, p: Object, arch: Arch, osec: int, psec: int, olo: int, ohi: int, plo: int,
               phi: int, cache: dict[int, bool], pi: int) -> bool:
    """True when every differing instruction loads an immediate into an argument register of a
    __LINE__-taking helper and the function calls such a helper."""
    if not arch.cs_arch or not arch.line_regs:
        return False
    if not _calls_line_helper(p, psec, plo, phi):
        return False
    from .disasm import instructions
    a = instructions(arch, o.section_data(osec)[olo:ohi])
    b = instructions(arch, p.section_data(psec)[plo:phi])
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        if x[0] != y[0] or x[1] != y[1]:  # size or mnemonic
            return False
        if x[1] not in arch.line_mnemonics:
            return False
        # capstone prints the destination first on every architecture we decode (s390 as ``%r3``)
        dst_x, dst_y = x[2].replace(" ", "").split(",")[0], y[2].replace(" ", "").split(",")[0]
        if dst_x != dst_y or dst_y.lstrip("%") not in arch.line_regs:
            return False
    return True


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
