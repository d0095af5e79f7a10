"""The *read* stage: one relocatable object with the derived facts the later stages need.

An :class:`Object` wraps an :class:`~klpforge.elf.ElfFile` and adds, as numpy arrays indexed by symbol or
section: the symbol's canonical name, its FILE scope, which section symbol stands for which section,
and which function or object each ``-ffunction-sections``/``-fdata-sections`` section holds.

>>> obj = Object.load("fs/proc/meminfo.o")
>>> obj.sym_names[obj.section_owner[obj.find_section(".text.meminfo_proc_show")]]
'meminfo_proc_show'
"""

from __future__ import annotations

import bisect
from functools import cached_property
from pathlib import Path

import numpy as np

from ..elf import ElfFile
from ..elf import constants as C
from ..elf.validate import check_relocs, check_sections, check_symbols
from ..util.errors import InputError
from .names import canonical, section_subject
from .secnames import OBJTOOL_ANNOTATIONS

__all__ = ["Object", "IGNORED_SECTIONS", "is_ignored_section", "PREFIX_NAMES", "MAX_PREFIX"]

#: Symbols that stand for the bytes in front of a function, never functions of their own: objtool's
#: ``--prefix=N`` names the call padding ``__pfx_<fn>`` (Linux >= 6.2, ``CONFIG_CALL_PADDING``:
#: ``-fpatchable-function-entry=16,16``, tools/objtool/elf.c ``elf_create_prefix_symbol``), clang's kCFI
#: the type-hash preamble ``__cfi_<fn>``. The kernel writes into these bytes at load (x86
#: ``arch/x86/kernel/callthunks.c``: call-depth accounting thunks, only where they are NOPs; FineIBT).
PREFIX_NAMES = ("__pfx_", "__cfi_")
#: How far in front of its function a prefix may start (bytes): padding plus a kCFI preamble, aligned.
MAX_PREFIX = 64

#: Sections that never take part in the diff: metadata, regenerated tables, debug info.
IGNORED_SECTIONS = (".comment", ".note.GNU-stack", ".note.gnu.property", "__mcount_loc",
                    "__patchable_function_entries", ".sframe", ".llvm_addrsig", ".modinfo",
                    ".kpatch.ignore.sections", ".kpatch.ignore.functions", ".kpatch.ignore.data",
                    ".kpatch.ignore.static", ".kpatch.force", ".BTF", ".BTF.ext",
                    ".eh_frame", ".gnu.build.attributes")
_IGNORED_PREFIXES = (".discard", ".debug_", ".note", ".llvm", ".rela.debug_", ".gnu.lto",
                     "___ksymtab", "___kcrctab", "__ksymtab", "__kcrctab", ".comment", ".stab")



def is_ignored_section(name: str) -> bool:
    """True for sections the diff neither compares nor copies (see :data:`IGNORED_SECTIONS`)."""
    return (name in IGNORED_SECTIONS or name.startswith(_IGNORED_PREFIXES)) and name not in OBJTOOL_ANNOTATIONS


class Object:
    """A relocatable object prepared for correlation."""

    def __init__(self, elf: ElfFile):
        if elf.symtab_index is None:
            raise InputError(f"{elf.path}: has no symbol table (stripped?): nothing to correlate")
        check_sections(elf)
        check_symbols(elf)
        self.elf = elf
        self.path = elf.path
        self.sec_names = elf.section_names
        self.shdrs = elf.shdrs
        self.syms = elf.syms
        self.sym_names = elf.sym_names
        self.nsym = len(self.syms)
        self.nsec = len(self.shdrs)
        self.stype = (self.syms["info"] & 0xF).astype(np.int64)
        self.sbind = (self.syms["info"] >> 4).astype(np.int64)
        self.shndx = self.syms["shndx"].astype(np.int64)
        self.value = self.syms["value"].astype(np.int64)
        self.size = self.syms["size"].astype(np.int64)
        self.defined = (self.shndx != C.SHN_UNDEF) & ~elf.sym_special
        self.canon = [canonical(n) for n in self.sym_names]
        self._scopes()
        self._prefixes()
        self._sections()

    @classmethod
    def load(cls, path: str | Path) -> Object:
        """Read ``path``, which must be a relocatable object."""
        return cls(ElfFile.open(path, require_rel=True))

    # -- derived tables -------------------------------------------------------------------------------

    def _scopes(self) -> None:
        """``file_of[i]``: name of the STT_FILE symbol whose block holds local symbol ``i`` ('' if none)."""
        files = np.flatnonzero(self.stype == C.STT_FILE)
        self.file_names = [self.sym_names[i] for i in files]
        scope = np.searchsorted(files, np.arange(self.nsym), side="right") - 1
        scope[self.sbind != C.STB_LOCAL] = -1
        self.scope = scope
        self.main_file = self.file_names[0] if self.file_names else ""

    def _prefixes(self) -> None:
        """``is_prefix[i]``: symbol ``i`` is a ``__pfx_``/``__cfi_`` prefix of a function of its section
        (:data:`PREFIX_NAMES`); ``prefix_syms[f]``: the prefix symbols of function ``f``; ``pad_start[f]``:
        the section offset where the bytes in front of ``f`` that belong to it begin, from its prefix
        symbols or, without them (objtool has not run: IBT kernels run it on the linked module only), from
        its ``__patchable_function_entries`` entry (GCC ``-fpatchable-function-entry=N,M`` with M > 0
        records the first padding byte). Functions without padding (6.1) have no entry in either."""
        self.is_prefix = np.zeros(self.nsym, dtype=bool)
        self.prefix_syms: dict[int, list[int]] = {}
        self.pad_start: dict[int, int] = {}
        funcs = np.flatnonzero((self.stype == C.STT_FUNC) & self.defined)
        names = self.sym_names
        cand = [i for i in funcs.tolist() if names[i].startswith(PREFIX_NAMES)]
        pfe = self.find_section("__patchable_function_entries")
        if not cand and pfe is None:
            return
        by_name: dict[tuple[int, str], list[int]] = {}
        for i in funcs.tolist():
            by_name.setdefault((int(self.shndx[i]), names[i]), []).append(i)
        for i in cand:
            v, sec = int(self.value[i]), int(self.shndx[i])
            for f in by_name.get((sec, names[i][len("__pfx_"):]), ()):
                fv = int(self.value[f])
                if v + int(self.size[i]) <= fv and fv - v <= MAX_PREFIX and f != i:
                    self.is_prefix[i] = True
                    self.prefix_syms.setdefault(f, []).append(i)
                    self.pad_start[f] = min(self.pad_start.get(f, fv), v)
        if pfe is not None:
            self._padding_entries(funcs)

    def _padding_entries(self, funcs: np.ndarray) -> None:
        """:meth:`_prefixes` from ``__patchable_function_entries`` (one section per function with
        ``SHF_LINK_ORDER``, or one for the object): each entry's relocation names the first byte."""
        starts: dict[int, list[int]] = {}
        for s in range(1, self.nsec):
            if self.sec_names[s] != "__patchable_function_entries":
                continue
            rs = self.elf.reloc_sections.get(s)
            if rs is None:
                continue
            for x in self.elf.relocs(rs):
                t = int(x["sym"])
                if t >= self.nsym or not self.defined[t]:
                    continue
                starts.setdefault(int(self.shndx[t]), []).append(int(self.value[t]) + int(x["addend"]))
        if not starts:
            return
        ends: dict[int, list[int]] = {}
        real = funcs[~self.is_prefix[funcs]].tolist()
        for i in real:
            ends.setdefault(int(self.shndx[i]), []).append(int(self.value[i]) + int(self.size[i]))
        for lst in (*starts.values(), *ends.values()):
            lst.sort()
        for f in real:  # O(n log n): a vmlinux.o .text without -ffunction-sections has tens of thousands
            sec, fv = int(self.shndx[f]), int(self.value[f])
            st = starts.get(sec, [])
            k = bisect.bisect_left(st, fv) - 1
            if k < 0 or st[k] < fv - MAX_PREFIX:
                continue
            e = st[k]
            # the padding lies between the previous function's end and this one's start
            en = ends.get(sec, [])
            if bisect.bisect_left(en, fv) > bisect.bisect_right(en, e):
                continue
            self.pad_start[f] = min(self.pad_start.get(f, fv), e)

    def code_range(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of function ``i`` with the prefix in front of it (``pad_start``)."""
        lo, hi = self.sym_range(i)
        return min(lo, self.pad_start.get(i, lo)), hi

    def _sections(self) -> None:
        n = self.nsec
        secsym = np.full(n, -1, np.int64)
        is_sec = (self.stype == C.STT_SECTION) & self.defined
        idx = np.flatnonzero(is_sec)
        secsym[self.shndx[idx]] = idx
        self.section_symbol = secsym
        # Owner: the function/object a -ffunction-sections section is named after, else the only one in it.
        owner = np.full(n, -1, np.int64)
        # a prefix (__pfx_fn) belongs to its function: never a member of its own (the section is not shared)
        fo = np.flatnonzero(((self.stype == C.STT_FUNC) | (self.stype == C.STT_OBJECT)) & self.defined
                            & ~self.is_prefix)
        # members per section, grouped with one stable sort (no per-symbol Python loop); the dict keeps
        # the order in which sections first appear in the symbol table
        secs = self.shndx[fo]
        order = np.argsort(secs, kind="stable")
        fs, ss = fo[order], secs[order]
        cut = np.flatnonzero(ss[1:] != ss[:-1]) + 1
        starts = np.concatenate(([0], cut)).astype(np.int64) if len(fs) else np.zeros(0, np.int64)
        ends = np.concatenate((cut, [len(fs)])).astype(np.int64) if len(fs) else np.zeros(0, np.int64)
        first = np.argsort(fs[starts], kind="stable")
        fl = fs.tolist()
        by_sec: dict[int, list[int]] = {k: fl[a:b] for k, a, b in zip(ss[starts][first].tolist(),
                                                                        starts[first].tolist(),
                                                                        ends[first].tolist(), strict=True)}
        self.syms_in_section = by_sec
        #: per section: how many function/object symbols it holds, and the first of them (-1 if none)
        self.member_count = np.bincount(secs, minlength=n)[:n] if len(fo) else np.zeros(n, np.int64)
        self.first_member = np.full(n, -1, np.int64)
        self.first_member[ss[starts]] = fs[starts]
        for sec, members in by_sec.items():
            subject = section_subject(self.sec_names[sec])
            pick = -1
            if subject is not None:
                named = [m for m in members if self.sym_names[m] == subject]
                if not named and subject:
                    # .text.unlikely.foo holds foo.cold; .text.foo.isra.0 holds foo.isra.0.
                    named = [m for m in members if self.sym_names[m].startswith(subject + ".")]
                if len(named) == 1:
                    pick = named[0]
            if pick < 0 and len(members) == 1 and subject is not None:
                pick = members[0]
            owner[sec] = pick
        self.section_owner = owner
        # The one function/object of a section that holds exactly one (and owns it), else -1.
        one = (self.member_count == 1) & (owner >= 0) & (owner == self.first_member)
        self.single_symbol = np.where(one, self.first_member, -1)

    # -- lookups --------------------------------------------------------------------------------------

    def find_section(self, name: str) -> int | None:
        return self.elf.find_section(name)

    def section_data(self, sec: int) -> bytes:
        return self._data_cache(sec)

    @cached_property
    def _bytes_cache(self) -> dict[int, bytes]:
        return {}

    def _data_cache(self, sec: int) -> bytes:
        c = self._bytes_cache
        b = c.get(sec)
        if b is None:
            b = c[sec] = self.elf.section_bytes(sec)
        return b

    @cached_property
    def all_relocs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every relocation of the object in one table sorted by (target section, offset): ``(relocs,
        target section per entry, start index per section)``; section ``s`` owns
        ``relocs[start[s]:start[s + 1]]``. One pass instead of one small array per section."""
        from ..elf.types import RELOC

        pairs = [(tgt, rs) for tgt, rs in self.elf.reloc_sections.items() if tgt < self.nsec]
        rsecs = [rs for _, rs in pairs]
        rel, origin = self.elf.relocs_bulk(rsecs)
        check_relocs(self.elf, rsecs, rel, origin)
        if not len(rel):
            rel = np.zeros(0, RELOC)
        sec = np.array([t for t, _ in pairs], dtype=np.int64)[origin] if len(pairs) else np.zeros(0, np.int64)
        order = np.lexsort((rel["offset"], sec))
        rel, sec = rel[order], sec[order]
        start = np.searchsorted(sec, np.arange(self.nsec + 1))
        return rel, sec, start

    def relocs(self, sec: int) -> np.ndarray:
        """Relocations that apply to section ``sec``, sorted by offset (a view; empty if none)."""
        rel, _, start = self.all_relocs
        return rel[start[sec]:start[sec + 1]]

    def symbol_at(self, sec: int, offset: int) -> int:
        """The function/object symbol of section ``sec`` that covers ``offset`` (-1 if none).

        An offset equal to a symbol's end counts for it when no other symbol starts there, since GCC
        addresses one-past-the-end (``&array[N]``)."""
        members = self.syms_in_section.get(sec)
        if not members:
            return -1
        if len(members) == 1 and self.section_owner[sec] == members[0]:
            # -fdata-sections: a PC-relative access with an immediate after the displacement
            # (``addl $3, x(%rip)`` stores x-8) still means x.
            return members[0]
        if len(members) > 16:
            return self._symbol_at_sorted(sec, members, offset)
        return self.symbol_at_linear(members, offset)

    def symbol_at_linear(self, members: list[int], offset: int) -> int:
        """The rule :meth:`symbol_at` implements, by a scan of ``members`` in symbol-table order: the first
        symbol covering ``offset``, else the first ending exactly there."""
        best = -1
        for m in members:
            v, s = int(self.value[m]), int(self.size[m])
            if v <= offset < v + max(s, 1):
                return m
            if offset == v + s and best < 0:
                best = m
        return best

    @cached_property
    def _sorted_members(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        return {}

    def sorted_members(self, sec: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The function/object symbols of ``sec`` sorted by (address, symbol index): starts, ends (at
        least one byte long), symbols, and the largest end among the symbols before each one (to tell
        at once whether an earlier symbol overlaps a place)."""
        t = self._sorted_members.get(sec)
        if t is None:
            m = np.array(self.syms_in_section.get(sec, []), np.int64)
            m = m[np.lexsort((m, self.value[m]))]
            starts = self.value[m]
            ends = starts + np.maximum(self.size[m], 1)
            prev = np.concatenate([[np.iinfo(np.int64).min], np.maximum.accumulate(ends)[:-1]]) if len(m) else ends
            t = self._sorted_members[sec] = (starts, ends, m, prev)
        return t

    def _symbol_at_sorted(self, sec: int, members: list[int], offset: int) -> int:
        """:meth:`symbol_at` for a section holding many symbols (a vmlinux.o ``.text`` built without
        -ffunction-sections has thousands): binary search, then the same tie rules over the few
        symbols that can overlap the place (aliases, nested labels)."""
        starts, ends, syms, prev = self.sorted_members(sec)
        k = int(np.searchsorted(starts, offset, side="right"))
        if k and ends[k - 1] > offset and prev[k - 1] <= offset:
            return int(syms[k - 1])  # the only symbol covering the place
        lo = max(0, k - 64)
        cover = [int(syms[j]) for j in range(lo, k) if ends[j] > offset]
        if cover:
            return min(cover)  # the first in symbol-table order, like the linear rule
        at_end = [int(syms[j]) for j in range(lo, k) if int(starts[j]) + int(self.size[syms[j]]) == offset]
        return min(at_end) if at_end else -1

    def sym_range(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of symbol ``i`` in its section (the whole section if size 0)."""
        v, s = int(self.value[i]), int(self.size[i])
        if s == 0 and self.defined[i]:
            s = int(self.shdrs["size"][self.shndx[i]]) - v
        return v, v + s

    @cached_property
    def special_named_sections(self) -> np.ndarray:
        """Per section: is its name that of a special static (``.data..Lubsan_data12``...)?"""
        from .names import is_special_static

        return np.array([is_special_static(n) for n in self.sec_names], dtype=bool)

    def sym_ranges(self, syms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sym_range` for many symbols at once."""
        v, s = self.value[syms], self.size[syms]
        secsize = self.shdrs["size"].astype(np.int64)[np.clip(self.shndx[syms], 0, self.nsec - 1)]
        s = np.where((s == 0) & self.defined[syms], secsize - v, s)
        return v, v + s

    def is_text(self, sec: int) -> bool:
        return bool(int(self.shdrs["flags"][sec]) & C.SHF_EXECINSTR)

    def section_flags(self, sec: int) -> int:
        return int(self.shdrs["flags"][sec])
