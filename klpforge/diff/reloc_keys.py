"""What a relocation points at, as a comparable key shared by the original and patched objects.

A key never contains a raw symbol index, section offset or displacement: a correlated symbol (by its
original index), an external by name, a string literal by content, a switch table or anonymous table by
content, a special static by kind. Keys are interned to integers so whole relocation tables compare with
numpy.

>>> keys = TargetKeys(correlate(orig, patched), arch_for(62))
>>> keys.key_of(int(keys.object_keys(orig)[2][0]))
('ext', '__fentry__')
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from ..elf import constants as C
from ..util.arrays import unique
from .arch import Arch
from .correlation import Correlation
from .model import Object
from .names import canonical, is_local_label, is_special_static, special_kind
from .pcrel import pcrel_tails

__all__ = ["TargetKeys", "SYM_BASE", "str_key"]

#: ``<source file>:<line>`` inside a string literal: ``__FILE__ ":" __stringify(__LINE__)``, as 6.1's
#: FORTIFY_SOURCE ``memcpy`` check builds its warning (include/linux/fortify-string.h
#: ``__fortify_memcpy_chk``: ``"field \"" #p "\" at " __FILE__ ":" __stringify(__LINE__)``).
_FILE_LINE = re.compile(rb"([\w+-][\w.+/-]*\.[chS]):[0-9]+")


def str_key(s: bytes) -> tuple[str, bytes]:
    """The comparison key of string literal ``s``: its content, with the line of each ``file.c:LINE`` in it
    left out, so that a moved line (a comment added above) does not change the functions using it.

    >>> str_key(b'field "d->d_iname" at fs/dcache.c:2815') == str_key(b'field "d->d_iname" at fs/dcache.c:2817')
    True
    >>> str_key(b"fs/dcache.c") == str_key(b"fs/namei.c")
    False
    """
    if b":" in s:
        s = _FILE_LINE.sub(rb"\1:#", s)
    return ("str", s)

#: Key ids at or above this stand for a correlated symbol (``SYM_BASE + orig index``), below for interned keys.
SYM_BASE = 1 << 40


class TargetKeys:
    """Comparable keys for what a relocation points at, shared by both objects of a correlation."""

    def __init__(self, corr: Correlation, arch: Arch):
        self.corr = corr
        self.arch = arch
        self._starts_cache: dict[int, dict[int, np.ndarray]] = {}
        self._toc_cache: dict[tuple[int, int, int], tuple[object, ...]] = {}
        self._anon: dict[tuple[int, int, int], str] = {}
        self._points: dict[int, np.ndarray] = {}
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
            add = r["addend"].astype(np.int64) + pcrel_tails(obj, self.arch, r, obj.all_relocs[1])
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
        if canonical(name) == "CSWTCH":  # a switch table (CSWTCH.12): what matters is its content
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
            return str_key(data[v:end if end >= 0 else len(data)])
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

    def anon_extent(self, obj: Object, sec: int, where: int) -> tuple[int, int]:
        """The bytes ``[lo, hi)`` a reference to ``sec+where`` addresses in a section with no symbol there
        (anonymous ``.rodata`` constants, ``.rodata.cstN``): one entry of a merge section (``sh_entsize``),
        else from the place to the next place anything references or a symbol starts, or the section end.
        Comparing these bytes, not the whole section, keeps one changed constant from marking every user of
        the section changed."""
        size = int(obj.shdrs["size"][sec])
        lo = min(max(where, 0), size)
        ent = int(obj.shdrs["entsize"][sec])
        if obj.section_flags(sec) & C.SHF_MERGE and ent > 0:
            lo -= lo % ent
            return lo, min(lo + ent, size)
        keys = self._bounds(obj)
        k = int(np.searchsorted(keys, (sec << 40) | lo, side="right"))
        nxt = int(keys[k]) & ((1 << 40) - 1) if k < len(keys) and int(keys[k]) >> 40 == sec else size
        return lo, max(lo, min(nxt, size))

    def _bounds(self, obj: Object) -> np.ndarray:
        """Sorted ``section << 40 | place`` of every place a section-symbol relocation points at and every
        named symbol's start (cached per object): where an anonymous constant ends."""
        c = self._points.get(id(obj))
        if c is None:
            r = obj.all_relocs[0]
            syms = r["sym"].astype(np.int64)
            m = obj.stype[syms] == C.STT_SECTION if len(r) else np.zeros(0, bool)
            where = np.clip(r["addend"][m].astype(np.int64) + self.biases(r["type"][m]), 0, (1 << 40) - 1)
            named = np.flatnonzero(obj.defined & (obj.stype != C.STT_SECTION))
            c = unique(np.concatenate([(obj.shndx[syms[m]] << 40) | where,
                                          (obj.shndx[named] << 40) | np.clip(obj.value[named], 0, (1 << 40) - 1)]))
            self._points[id(obj)] = c
        return c

    def _starts(self, obj: Object) -> dict[int, np.ndarray]:
        """Per section, the sorted start offsets of the symbols defined in it (cached per object)."""
        c = self._starts_cache.get(id(obj))
        if c is None:
            named = np.flatnonzero(obj.defined & (obj.stype != C.STT_SECTION))
            order = named[np.lexsort((obj.value[named], obj.shndx[named]))]
            secs = obj.shndx[order]
            cut = np.flatnonzero(np.diff(secs)) + 1
            c = {int(g[0]): unique(obj.value[o]) for g, o in zip(np.split(secs, cut), np.split(order, cut),
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
        r = obj.relocs(sec)  # sorted by offset: a place-sized digest must not scan the whole section
        a, b = np.searchsorted(r["offset"], [lo, hi])
        for x in r[a:b]:
            s = int(x["sym"])
            tgt = obj.sym_names[s] if obj.stype[s] != C.STT_SECTION else obj.sec_names[int(obj.shndx[s])]
            row = f"{int(x['offset']) - lo}:{int(x['type'])}:{tgt}:{int(x['addend'])};"
            h.update(row.encode("utf-8", "surrogateescape"))  # names may hold undecodable bytes
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

    def biases(self, types: np.ndarray) -> np.ndarray:
        """:attr:`Arch.pcrel_bias` for an array of relocation types (0 for the others, and for any
        nonsense type a damaged file may hold)."""
        out = np.zeros(len(types), np.int64)
        for t, b in self.arch.pcrel_bias.items():
            out[types == t] = b
        return out

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
            # All string sections laid end to end: one searchsorted over every NUL finds each string.
            ssec = rsec[strs]
            uniq = unique(ssec)
            blobs = [obj.section_data(int(x)) for x in uniq.tolist()]
            sizes = np.array([len(b) for b in blobs], np.int64)
            base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            buf = b"".join(blobs)
            nul = np.flatnonzero(np.frombuffer(buf, np.uint8) == 0)
            g = np.searchsorted(uniq, ssec)
            lo, hi = base[g], base[g] + sizes[g]
            where = lo + np.clip(add[sj] + self.biases(r["type"][sj]), 0, None)
            k = np.searchsorted(nul, where, side="left")
            prev = np.where(k > 0, nul[np.clip(k - 1, 0, max(len(nul) - 1, 0))] + 1, 0) if len(nul) else lo
            nxt = np.where(k < len(nul), nul[np.clip(k, 0, max(len(nul) - 1, 0))], hi) if len(nul) else hi
            start, end = np.maximum(prev, lo), np.minimum(nxt, hi)
            for jj, st, en, b0 in zip(sj.tolist(), start.tolist(), end.tolist(), lo.tolist(), strict=True):
                kid[jj] = self.intern(str_key(buf[st:en]))
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
            where = add[j] + self.biases(r["type"][j])
            k = np.searchsorted(starts, where, side="right") - 1
            kk = np.clip(k, 0, None)
            ok = (k >= 0) & (ends[kk] > where) & (prev[kk] <= where)
            t = msyms[kk[ok]]
            kid[j[ok]] = sid[t]
            add[j[ok]] = add[j[ok]] - obj.value[t]
            done[grp[ok]] = True
        return left[~done]

    def key(self, obj: Object, sym: int, rtype: int, addend: int,
            site: tuple[int, int] | None = None) -> tuple[object, int]:
        """(what, addend relative to it) for one relocation of ``obj``. With the relocation's ``site``
        (section, offset), an x86-64 immediate after the field counts (klpforge/diff/pcrel.py); without it the
        addend is taken to include that already."""
        if site is not None:
            rel = np.zeros(1, obj.all_relocs[0].dtype)
            rel["offset"], rel["sym"], rel["type"], rel["addend"] = site[1], sym, rtype, addend
            addend += int(pcrel_tails(obj, self.arch, rel, np.array([site[0]], np.int64))[0])
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
            return str_key(data[start: end if end >= 0 else len(data)]), addend - start
        if name in self.arch.toc_sections:
            return self.toc_key(obj, sec, where), addend - where
        t = obj.symbol_at(sec, where)
        if t >= 0:
            return self.symkey(obj, t), addend - int(obj.value[t])
        if obj.is_text(sec):
            # Code outside any function (.altinstr_replacement, .fixup, .altinstr_aux) is compared through
            # the special-section entries that point at it; .altinstr_aux offsets shift with any edit.
            return ("aux", name), (0 if name == ".altinstr_aux" else addend)
        lo, hi = self.anon_extent(obj, sec, where)
        ak = self._anon.get((id(obj), sec, lo))
        if ak is None:
            ak = self._anon[(id(obj), sec, lo)] = self.content_digest(obj, sec, lo, hi)
        return ("anon", ak), addend - lo
