"""The *emit* stage: write the livepatch object, with ``.klp.rela``/``.klp.sym`` emitted directly.

Every reference from included code to something that stays in the running kernel becomes either a
normal relocation against an undefined symbol (the target is exported by vmlinux, per
``Module.symvers``) or a klp relocation: a ``.klp.sym.<obj>.<name>,<sympos>`` symbol (``SHN_LIVEPATCH``)
and an entry in ``.klp.rela.<obj>.<section>`` (``SHF_RELA_LIVEPATCH``), which the kernel resolves
through kallsyms when the patch loads (Documentation/livepatch/module-elf-format.rst, 6.1).
Each replaced function also gets a global alias ``klpf_<obj>__<name>__<sympos>`` for the generated
module source to point ``klp_func.new_func`` at.

>>> out = emit(corr, cmp, sel, arch, EmitOptions(target="vmlinux", symtab=st))
>>> out.patched[0].old_name
'cmdline_proc_show'
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ...elf import ObjectWriter
from ...elf import constants as C
from ...elf.types import RELOC
from ...util.arrays import isin, unique
from ...util.errors import InputError
from ..arch import Arch
from ..compare import Comparison
from ..correlation import Correlation
from ..model import Object
from ..names import is_special_static
from ..secnames import KEPT_SPECIAL, OBJTOOL_ANNOTATIONS, is_aux_code
from ..select import Selection, resolve_target
from ..symtab import AmbiguousSymbol, Export, TargetSymtab, section_kind
from .carve import Carving, carve, carve_aux
from .special import ENV_NAMES, PAIRED, entry_size

__all__ = ["EmitOptions", "EmitResult", "PatchedFunc", "KlpReloc", "emit", "alias_name", "Emitter", "Unresolvable",
           "reloc_array"]


@dataclass
class EmitOptions:
    target: str  # "vmlinux" or a module name
    symtab: TargetSymtab
    symvers: Mapping[str, Export] | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PatchedFunc:
    """One ``klp_func``: the function replaced, its sympos, and the output symbol replacing it."""

    old_name: str
    sympos: int
    new_symbol: str
    new_name: str


@dataclass(frozen=True)
class KlpReloc:
    """One klp relocation, for the report: where, against what."""

    section: str
    offset: int
    type: int
    symbol: str
    addend: int
    obj: str = "vmlinux"  # the object the symbol lives in


@dataclass
class EmitResult:
    data: bytes
    patched: list[PatchedFunc]
    klp_relocs: list[KlpReloc]
    normal_externals: list[str]
    special_kept: dict[str, tuple[int, int]]  # table -> (kept, total)
    refusals: list[str]
    callbacks: dict[str, str]
    #: shared sections taken symbol by symbol -> (bytes kept, bytes in the patched object's section)
    carved: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: ``__jump_table``/``.static_call_sites`` entries keyed in a module, taken out (sites rewritten or
    #: calling the trampoline: :func:`_module_keyed_entries`) -> how many
    module_keyed: dict[str, int] = field(default_factory=dict)


def alias_name(obj: str, name: str, sympos: int) -> str:
    """A C identifier naming the new copy of ``name`` (for ``klp_func.new_func``)."""
    return f"klpf_{re.sub(r'[^A-Za-z0-9_]', '_', obj)}__{re.sub(r'[^A-Za-z0-9_]', '_', name)}__{sympos}"


class Emitter:
    def __init__(self, corr: Correlation, cmp: Comparison, sel: Selection, arch: Arch, opts: EmitOptions):
        self.corr, self.cmp, self.sel, self.arch, self.opts = corr, cmp, sel, arch, opts
        p = corr.patched
        self.p = p
        e = p.elf
        self.w = ObjectWriter(e.elfclass, e.endian, e.machine, e.e_flags, e.osabi)
        self.out_sec: dict[int, int] = {}  # patched section -> output handle
        self.out_sym: dict[int, int] = {}  # patched symbol -> output handle
        self.secsym: dict[int, int] = {}  # output section handle -> its section symbol
        self.ext: dict[str, int] = {}
        self.klp_sym: dict[str, int] = {}
        self.klp: dict[tuple[str, int], list[tuple[int, int, int, int]]] = defaultdict(list)
        self.klp_report: list[KlpReloc] = []
        self.refusals: list[str] = []
        self.siblings = frozenset(corr.orig.sym_names[i] for i in range(corr.orig.nsym)
                                  if corr.orig.sbind[i] == C.STB_LOCAL and corr.orig.defined[i]
                                  and corr.orig.stype[i] in (C.STT_FUNC, C.STT_OBJECT))
        o = corr.orig
        #: every function/object of the object -> (section kind, local?): the anchors that prove which copy of
        #: a duplicated static the target's kallsyms means (symtab.TargetSymtab._by_neighbours)
        self.kinds = {o.sym_names[i]: (section_kind(o.sec_names[int(o.shndx[i])], o.sym_names[i]),
                                       bool(o.sbind[i] == C.STB_LOCAL))
                      for i in range(1, o.nsym) if o.defined[i] and o.stype[i] in (C.STT_FUNC, C.STT_OBJECT)
                      and 0 < int(o.shndx[i]) < o.nsec}
        self._sympos_cache: dict[int, int] = {}
        self.cv = Carving()

    # -- symbols --------------------------------------------------------------------------------------

    def add_section(self, ps: int, data: bytes | None = None, size: int | None = None) -> int:
        p = self.p
        h = p.shdrs[ps]
        flags = int(h["flags"]) & ~C.SHF_GROUP
        link = 0
        if flags & _SHF_LINK_ORDER:  # one __patchable_function_entries per function, tied to its code
            link = self.out_sec.get(int(h["link"]), 0)
            if not link:
                flags &= ~_SHF_LINK_ORDER
        blob = p.section_data(ps) if data is None else data
        handle = self.w.add_section(p.sec_names[ps], int(h["type"]), flags, blob,
                                    size=size if size is not None else int(h["size"]) if data is None else len(data),
                                    addralign=int(h["addralign"]), entsize=int(h["entsize"]), link=link)
        self.out_sec[ps] = handle
        self.secsym[handle] = self.w.add_symbol("", handle, 0, 0, C.STT_SECTION, C.STB_LOCAL)
        return handle

    def orig_of(self, ps: int) -> int:
        return int(self.corr.p2o[ps])

    def sympos_of(self, oi: int) -> int:
        c = self._sympos_cache.get(oi)
        if c is None:
            o = self.corr.orig
            local = o.sbind[oi] == C.STB_LOCAL
            sc = int(o.scope[oi])
            file = o.file_names[sc] if sc >= 0 else o.main_file
            kind = section_kind(o.sec_names[int(o.shndx[oi])], o.sym_names[oi]) if 0 < int(o.shndx[oi]) < o.nsec \
                else ""
            c = self._sympos_cache[oi] = self.opts.symtab.sympos(o.sym_names[oi], file, bool(local),
                                                                 self.siblings, self.kinds, kind)
        return c

    def klp_symbol(self, obj: str, name: str, pos: int) -> int:
        full = f".klp.sym.{obj}.{name},{pos}"
        h = self.klp_sym.get(full)
        if h is None:
            h = self.klp_sym[full] = self.w.add_symbol(full, C.SHN_LIVEPATCH, 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
        return h

    def external(self, name: str) -> int:
        h = self.ext.get(name)
        if h is None:
            h = self.ext[name] = self.w.add_symbol(name, C.SHN_UNDEF, 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
        return h

    def resolve(self, sym: int, rtype: int, addend: int, site: tuple[int, int] | None = None,
                dry: bool = False) -> tuple[int, int, str | None, str]:
        """Output symbol handle, addend, klp object name (None for a normal relocation), display name.
        ``site``: the relocation's patched (section, offset), for resolve_target. ``dry``: only classify
        (no symbol is added; the handle returned for a klp relocation is 0)."""
        p = self.p
        if sym == 0:  # no symbol (ppc64 R_PPC64_ENTRY, R_*_NONE)
            return 0, addend, None, ""
        t, a = resolve_target(p, self.arch, sym, rtype, addend, site)
        if p.stype[sym] == C.STT_SECTION and int(p.shndx[sym]) in self.out_sec \
                and int(p.shndx[sym]) not in self.cv.ranges and _x86_jump_at(p, self.arch, site):
            # keep the assembler's section-relative form of a jump: objtool (run on the linked module where
            # the kernel delays it, IBT; 6.1 check.c add_jump_destinations) takes a jump against a function
            # symbol for a sibling call, so a jump into the function's own .cold part lost its ORC state
            t = sym
        if p.stype[sym] == C.STT_SECTION and int(p.shndx[sym]) in self.out_sec and site is not None \
                and 0 < site[0] < p.nsec and p.sec_names[site[0]] in OBJTOOL_ANNOTATIONS:
            # objtool reads an annotation against the section symbol (or a local label) only: 6.12 check.c
            # add_dead_ends stops with "unexpected relocation symbol type" for one against a function
            t = sym
        if p.stype[t] == C.STT_SECTION:
            ps = int(p.shndx[t])
            if ps in self.out_sec:
                # a PC-relative field in data (a table's ``.long label - .``) addresses the label itself
                code = site is None or not site[0] or self.p.is_text(site[0])
                bias = self.arch.pcrel_bias.get(rtype, 0) if code else 0
                new = self.cv.place(ps, addend + bias)
                if new is None:
                    raise Unresolvable(f"a reference to {p.sec_names[ps]}+{addend:#x}, which is not included")
                return self.secsym[self.out_sec[ps]], new - bias, None, p.sec_names[ps]
            raise Unresolvable(f"a reference to {p.sec_names[ps]}+{addend:#x}, which is not included")
        if t in self.out_sym:
            return self.out_sym[t], a, None, p.sym_names[t]
        name = p.sym_names[t]
        exp = (self.opts.symvers or {}).get(name)
        if not p.defined[t]:
            if (exp is not None and exp.module == "vmlinux") or name in self.arch.loader_symbols:
                return self.external(name), a, None, name
            obj = exp.module if exp is not None else (
                self.opts.target if self.opts.symtab.has(name) else "vmlinux")
            return (0 if dry else self.klp_symbol(obj, name, 0)), a, obj, name
        oi = self.orig_of(t)
        if oi < 0:
            raise Unresolvable(f"{name}, which is neither included nor present in the original object")
        oname = self.corr.orig.sym_names[oi]
        if exp is not None and exp.module == "vmlinux" and self.corr.orig.sbind[oi] != C.STB_LOCAL:
            return self.external(oname), a, None, oname
        if dry:
            return 0, a, self.opts.target, oname
        pos = self.sympos_of(oi)
        return self.klp_symbol(self.opts.target, oname, pos), a, self.opts.target, oname

    # -- layout -----------------------------------------------------------------------------------------

    def lay_out(self, labels_local: bool = False) -> tuple[set[int], dict[int, SpecialTable]]:
        """Add the FILE symbol, the included sections (shared ones carved to the included symbols: carve.py),
        their symbols and labels; returns the included patched sections and the cut special tables.
        ``labels_local``: typeless labels become local (Xen) instead of keeping their binding."""
        p, sel, corr = self.p, self.sel, self.corr
        files = np.flatnonzero(p.stype == C.STT_FILE)
        if len(files):
            self.w.add_symbol(p.sym_names[int(files[0])], C.SHN_ABS, 0, 0, C.STT_FILE, C.STB_LOCAL)
        sections = set(sel.sections)
        cv = self.cv = carve(p, self.arch, sel, sections)
        self.refusals.extend(cv.refusals)
        specials = _special_tables(p, sel, sections, self.opts, self.arch, cv)
        carve_aux(p, self.arch, sections, [(t[0], t[1], t[2], len(t[1]) // t[4]) for t in specials.values()], cv)
        for ps in sorted(sections):
            self.add_section(ps, cv.data.get(ps), cv.size.get(ps))
        patched_set = set(sel.patched)
        for ps in sorted(sections):
            for s in p.syms_in_section.get(ps, []):
                if ps in cv.ranges and s not in sel.included:
                    continue  # an unchanged neighbour: references to it stay references to the running one
                bind = int(p.sbind[s])
                if s in patched_set or self.cmp.status.get(s) == "changed" or corr.p2o[s] >= 0:
                    bind = C.STB_LOCAL  # the running kernel keeps the global; ours is reached via klp_func
                self.out_sym[s] = self.w.add_symbol(p.sym_names[s], self.out_sec[ps], _out_value(cv, p, s),
                                                    int(p.size[s]), int(p.stype[s]), bind, int(p.syms["other"][s]))
                self._add_prefixes(s)
        # Labels and typeless symbols inside included sections keep working too.
        for s in range(1, p.nsym):
            ps = int(p.shndx[s])
            if s not in self.out_sym and ps in self.out_sec and p.stype[s] == C.STT_NOTYPE and p.sym_names[s]:
                v = cv.place(ps, int(p.value[s]))
                if v is not None:
                    self.out_sym[s] = self.w.add_symbol(p.sym_names[s], self.out_sec[ps], v, 0, C.STT_NOTYPE,
                                                        C.STB_LOCAL if labels_local else int(p.sbind[s]))
        return sections, specials

    def _add_prefixes(self, f: int) -> None:
        """The ``__pfx_``/``__cfi_`` symbols of included function ``f`` (model.PREFIX_NAMES), local: they
        travel with it (its padding bytes came along: carve.py), never stand for a function of their own,
        and must not clash with the running kernel's global ``__pfx_`` of the old copy."""
        p = self.p
        for x in p.prefix_syms.get(f, ()):
            ps = int(p.shndx[x])
            v = self.cv.place(ps, int(p.value[x]))
            if v is None or x in self.out_sym:
                continue
            self.out_sym[x] = self.w.add_symbol(p.sym_names[x], self.out_sec[ps], v, int(p.size[x]),
                                                int(p.stype[x]), C.STB_LOCAL, int(p.syms["other"][x]))

    def relocate_all(self, sections: set[int], specials: dict[int, SpecialTable]) -> dict[str, tuple[int, int]]:
        """Relocations of the included sections (their own and the carving's new ones) and of the cut special
        tables, which are added; returns table name -> (entries kept, entries before)."""
        p, sel, cv = self.p, self.sel, self.cv
        for ps in sorted(sections):
            r = p.relocs(ps)
            if ps in sel.toc_slots:  # only the slots included code uses; the others stay unrelocated
                r = r[isin(r["offset"], sorted(sel.toc_slots[ps]))]
            entries = list(zip(r["offset"].tolist(), r["sym"].tolist(), r["type"].tolist(), r["addend"].tolist(),
                               strict=True)) + cv.extra.get(ps, [])
            self.relocate(self.out_sec[ps], sorted(entries), p.sec_names[ps], src=ps)
        kept: dict[str, tuple[int, int]] = {}
        for ps, (name, data, relocs, total, nkept) in specials.items():
            h = self.add_section(ps, data)
            self.relocate(h, relocs, name, table=ps)
            was = kept.get(name, (0, 0))  # several sections of one name (per-function PFE sections)
            kept[name] = (was[0] + nkept, was[1] + total)
        return kept

    # -- relocations ----------------------------------------------------------------------------------

    def relocate(self, handle: int, relocs: list[tuple[int, int, int, int]], where: str, src: int = 0,
                 table: int = 0) -> None:
        """Convert ``(offset, patched symbol, type, addend)`` entries for output section ``handle``. With
        ``src`` (the patched section they come from), offsets are patched ones: entries outside the kept
        part of a carved section are dropped, the others moved. ``table``: the patched special section
        a rebuilt table comes from (its offsets are new)."""
        normal = []
        for off, s, t, a in relocs:
            site = (table, off) if table else None
            if src:
                site = (src, off)
                new = self.cv.place(src, off, inside=True)
                if new is None:
                    continue  # in a neighbour carved away
                off = new
            try:
                sym, add, klp_obj, disp = self.resolve(s, t, a, site)
            except Unresolvable as e:
                self.refusals.append(f"{where}+{off:#x} refers to {e}")
                continue
            if klp_obj is None:
                normal.append((off, sym, t, add))
            else:
                self.klp[(klp_obj, handle)].append((off, sym, t, add))
                self.klp_report.append(KlpReloc(self.w.section_name(handle), off, t, disp, add, klp_obj))
        if normal:
            self.w.add_relocations(handle, reloc_array(normal), rela=True)

    def finish_klp(self) -> None:
        for (obj, handle), entries in sorted(self.klp.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            secname = self.w.section_name(handle)
            self.w.add_relocations(handle, reloc_array(entries),
                                   name=f".klp.rela.{obj}.{secname.lstrip('.')}", rela=True,
                                   flags=C.SHF_ALLOC | C.SHF_INFO_LINK | C.SHF_RELA_LIVEPATCH)


def _x86_jump_at(p: Object, arch: Arch, site: tuple[int, int] | None) -> bool:
    """True when the x86-64 relocation at ``site`` (patched section, offset) is the field of a ``jmp rel32``
    or ``jcc rel32`` (not a call, not data)."""
    if site is None or arch.machine != C.EM_X86_64 or not (0 < site[0] < p.nsec) or not p.is_text(site[0]):
        return False
    data, off = p.section_data(site[0]), site[1]
    return (off >= 1 and data[off - 1] == 0xE9) or (off >= 2 and data[off - 2] == 0x0F
                                                   and 0x80 <= data[off - 1] <= 0x8F)


#: gABI ``SHF_LINK_ORDER``: ``sh_link`` names the section this one belongs with.
_SHF_LINK_ORDER = 0x80


class Unresolvable(Exception):
    """A reference the emitter cannot express (no symbol, no klp relocation); the Xen emitter handles it too."""


def reloc_array(entries: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(offset, symbol, type, addend) tuples as an ``Elf64_Rela`` table (``RELOC`` dtype, shape (n,))."""
    arr = np.zeros(len(entries), RELOC)
    if entries:
        arr["offset"], arr["sym"], arr["type"], arr["addend"] = zip(*entries, strict=True)
    return arr


def emit(corr: Correlation, cmp: Comparison, sel: Selection, arch: Arch, opts: EmitOptions) -> EmitResult:
    """Build the livepatch object from a selection."""
    em = Emitter(corr, cmp, sel, arch, opts)
    p = corr.patched
    sections, specials = em.lay_out()
    cv = em.cv
    rewritten = _module_keyed_entries(em, specials)

    patched: list[PatchedFunc] = []
    for s in sel.patched:
        oi = em.orig_of(s)
        if oi < 0:
            continue
        oname = corr.orig.sym_names[oi]
        try:
            pos = em.sympos_of(oi)
        except AmbiguousSymbol:
            raise  # not unsafe, only unknown here: a --distro build fetches FILE symbols and tries again
        except Exception as e:  # noqa: BLE001 - reported as a refusal with the symtab's message
            em.refusals.append(str(e))
            continue
        alias = alias_name(opts.target, oname, pos)
        # st_other too: it carries the ppc64 local entry point that direct calls must land on
        em.w.add_symbol(alias, em.out_sec[int(p.shndx[s])], _out_value(cv, p, s), int(p.size[s]), C.STT_FUNC,
                        C.STB_GLOBAL, int(p.syms["other"][s]))
        patched.append(PatchedFunc(oname, pos, alias, p.sym_names[s]))

    kept = em.relocate_all(sections, specials)
    em.finish_klp()
    # Callbacks are usually static: give each a global alias the generated module source can name.
    cbs: dict[str, str] = {}
    for kind, v in sel.callbacks.items():
        if v not in em.out_sym:
            continue
        alias = alias_name(opts.target, f"cb_{kind}_{p.sym_names[v]}", 0)
        em.w.add_symbol(alias, em.out_sec[int(p.shndx[v])], _out_value(cv, p, v), int(p.size[v]), C.STT_FUNC,
                        C.STB_GLOBAL)
        cbs[kind] = alias
    carved = {p.sec_names[s]: (cv.size[s], int(p.shdrs["size"][s])) for s in sorted(cv.ranges)}
    return EmitResult(em.w.build(), patched, em.klp_report, sorted(em.ext), kept, em.refusals, cbs, carved,
                      rewritten)


def _out_value(cv: Carving, p: Object, s: int) -> int:
    """Output st_value of included patched symbol ``s`` (moved when its section is carved)."""
    v = cv.place(int(p.shndx[s]), int(p.value[s]))
    return int(p.value[s]) if v is None else v


#: a cut special table: (name, new bytes, relocations, entries before, entries kept)
SpecialTable = tuple[str, bytes, list[tuple[int, int, int, int]], int, int]


def _special_tables(p: Object, sel: Selection, sections: set[int], opts: EmitOptions, arch: Arch,
                    cv: Carving) -> dict[int, SpecialTable]:
    """Cut each special table down to the entries of included code.

    Returns patched section -> (name, new bytes, relocations, entries before, entries kept); adds the
    auxiliary code sections (``.altinstr_replacement``, ``.fixup``) that kept entries point into."""
    out = {}
    ptr = 8 if p.elf.is64 else 4
    included_text = {s for s in sections if p.is_text(s)}
    kept_index: dict[str, list[int]] = {}
    names = [(ps, p.sec_names[ps]) for ps in range(1, p.nsec)]
    order = sorted(names, key=lambda x: x[1] in PAIRED)  # paired tables after their partners
    for ps, name in order:
        if not name.startswith(KEPT_SPECIAL) or not int(p.shdrs["size"][ps]):
            continue
        size = entry_size(name, opts.env, int(p.shdrs["entsize"][ps]), ptr)
        data = p.section_data(ps)
        if size > 1 << 16:  # no kernel table has entries this large: a damaged sh_entsize
            raise InputError(f"{name}: entry size {size} is not plausible: "
                             f"{ENV_NAMES.get(name, 'the entry size')} or the section header is wrong")
        # The assembler does not pad the last entry to the struct's alignment (.parainstructions).
        total = -(-len(data) // size)
        r = p.relocs(ps)
        if len(r) and int(r["offset"][-1]) >= total * size:
            var = ENV_NAMES.get(name, "the entry size")
            raise InputError(f"{name}: relocation beyond the last {size}-byte entry: {var} does not match")
        if name in PAIRED:
            keep = kept_index.get(PAIRED[name])
            if keep is None:
                continue
        else:
            keep = []
            idx = (r["offset"] // size).astype(np.int64)
            tsec = p.shndx[r["sym"].astype(np.int64)]
            inc = isin(tsec, np.fromiter(sections if name == ".printk_index" else included_text, np.int64))
            if name == ".printk_index":  # entries point only at strings: keep those whose strings all came along
                n_all = np.bincount(idx, minlength=total)
                n_inc = np.bincount(idx[inc], minlength=total)
                candidates = np.flatnonzero((n_all > 0) & (n_all == n_inc)).tolist()
            else:
                candidates = unique(idx[inc]).tolist()
            bounds = np.searchsorted(r["offset"], np.arange(total + 1, dtype=np.uint64) * size)
            for e in candidates:
                rr = r[bounds[e]:bounds[e + 1]]
                targets = [resolve_target(p, arch, int(x["sym"]), int(x["type"]), int(x["addend"]),
                                          (ps, int(x["offset"])))[0] for x in rr]
                secs = [int(p.shndx[t]) for t in targets]
                ok = name == ".printk_index" or any(
                    s in included_text and not is_aux_code(p.sec_names[s])
                    and cv.place(s, int(p.value[int(x["sym"])]) + int(x["addend"]), inside=True) is not None
                    for s, x in zip(secs, rr, strict=True))
                if ok:
                    keep.append(e)
                    for t in targets:
                        _pull_in(p, arch, t, name, sections, sel, included_text)
        kept_index[name] = keep
        if not keep:
            continue
        new = b"".join(data[e * size:(e + 1) * size].ljust(size, b"\0") for e in keep)
        relocs = []
        starts = np.searchsorted(r["offset"], np.array(keep, dtype=np.uint64) * size)
        ends = np.searchsorted(r["offset"], (np.array(keep, dtype=np.uint64) + 1) * size)
        for k, e in enumerate(keep):
            for x in r[starts[k]:ends[k]]:
                relocs.append((int(x["offset"]) - e * size + k * size, int(x["sym"]), int(x["type"]),
                               int(x["addend"])))
        out[ps] = (name, new, relocs, total, len(keep))
    return out


def _pull_in(p: Object, arch: Arch, t: int, table: str, sections: set[int], sel: Selection,
             included_text: set[int]) -> None:
    """Add what a kept table entry needs that the running kernel cannot provide: auxiliary code, the
    strings a BUG/WARN entry names, special statics (dynamic-debug descriptors), and what those need."""
    todo = [t]
    while todo:
        t = todo.pop()
        s = int(p.shndx[t])
        if s in sections or s == 0 or s >= p.nsec:
            continue
        name = p.sec_names[s]
        uncorrelated = p.stype[t] == C.STT_SECTION or p.sym_names[t].startswith(".L") \
            or is_special_static(p.sym_names[t])
        if is_aux_code(name):
            sel.sections[s] = f"code of a kept {table} entry"
            included_text.add(s)
        elif uncorrelated and not p.is_text(s):
            sel.sections[s] = f"data of a kept {table} entry"
        else:
            continue
        sections.add(s)
        r = p.relocs(s)
        todo.extend(resolve_target(p, arch, int(x["sym"]), int(x["type"]), int(x["addend"]))[0] for x in r)


#: x86 encodings of a jump-label site (6.1 ``arch/x86/include/asm/jump_label.h``, objtool's NOPs)
_X86_NOP5, _X86_NOP2 = bytes.fromhex("0f1f440000"), bytes.fromhex("6690")


def _module_keyed_entries(em: Emitter, specials: dict[int, SpecialTable]) -> dict[str, int]:
    """Drop the ``__jump_table``/``.static_call_sites`` entries whose key would be a klp relocation into a
    module, so that the tracepoints and static calls of replaced module code keep working.

    Why: 6.1's loader registers a module's jump labels and static-call sites in the ``MODULE_STATE_COMING``
    notifiers (``kernel/jump_label.c`` ``jump_label_add_module()``, ``kernel/static_call_inline.c``
    ``static_call_add_module()``), and applies only the vmlinux klp relocations before them
    (``kernel/module/main.c`` ``apply_relocations()``); module-specific ones are applied later, in
    ``klp_init_object_loaded()`` (``kernel/livepatch/core.c``). An entry keyed in a module would be read
    with its key field unresolved (the kernel would take the entry itself for the key and write into it).

    * A static call site (any key: tracepoints' ``__SCK__tp_func_<event>`` and others) loses its entry:
      the ``call __SCT__<name>`` stays a call of the static call's trampoline, which
      ``__static_call_update()`` always retargets (one extra ``jmp`` when the call is made).
    * A tracepoint's jump label (``static_key_false(&__tracepoint_<event>.key)``, x86) loses its entry
      and its site is written as the key enabled would have it: the code always reaches ``__DO_TRACE``,
      whose ``__tracepoint_<event>.funcs`` test stops it when no probe is registered (a load and a test
      while the event is off; the event fires from the new code when it is on).
    * Any other module-owned jump label is refused, naming the function and the key.

    Returns table name -> entries dropped (for the report); refusals go to ``em.refusals``."""
    p = em.p
    dropped: dict[str, int] = {}
    refused: set[str] = set()
    for ps, (name, data, relocs, total, nkept) in list(specials.items()):
        if name not in ("__jump_table", ".static_call_sites") or not nkept:
            continue
        size = len(data) // nkept
        by_entry: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
        for x in relocs:
            by_entry[x[0] // size].append(x)
        drop: set[int] = set()
        for e, rr in sorted(by_entry.items()):
            key = max(rr, key=lambda x: x[0])  # the key is the entry's last field
            try:
                _, _, obj, disp = em.resolve(key[1], key[2], key[3], dry=True)
            except Unresolvable:
                continue  # relocate() reports it
            if obj is None or obj == "vmlinux":
                continue  # resolved before the loader reads the table
            site = min(rr, key=lambda x: x[0])
            ssec, spos = _field_place(p, site)
            fn = p.symbol_at(ssec, spos) if ssec else -1
            where = p.sym_names[fn] if fn >= 0 else p.sec_names[ssec]
            if name == ".static_call_sites":
                drop.add(e)
                continue
            if not disp.startswith("__tracepoint_"):
                refused.add(f"function {where} tests jump label {disp}, a static key of module {obj}: 6.1 sets "
                            "up a live patch's jump labels before it resolves module symbols; test it with "
                            f"static_key_enabled() instead of static_branch_*()/static_key_*() in {where}")
                continue
            tgt = [x for x in rr if x is not site and x is not key]
            why = _enable_site(em, ssec, spos, tgt[0] if tgt else None, key[3] & 1)
            if why:
                refused.add(f"function {where}: the jump label of tracepoint {disp.removeprefix('__tracepoint_')}"
                            f" (module {obj}) cannot be rewritten: {why}")
                continue
            drop.add(e)
        if not drop:
            continue
        keep = [e for e in range(nkept) if e not in drop]
        new = b"".join(data[e * size:(e + 1) * size] for e in keep)
        renum = {e: k for k, e in enumerate(keep)}
        nrel = [(off - (off // size) * size + renum[off // size] * size, sy, t, a)
                for off, sy, t, a in relocs if off // size in renum]
        dropped[name] = dropped.get(name, 0) + len(drop)
        if keep:
            specials[ps] = (name, new, nrel, total, len(keep))
        else:
            del specials[ps]
    em.refusals.extend(sorted(refused))
    return dropped


def _field_place(p: Object, rel: tuple[int, int, int, int]) -> tuple[int, int]:
    """(patched section, offset) a table field's ``.long label - .`` relocation names (0, 0 if none)."""
    _, sym, _, addend = rel
    if not p.defined[sym]:
        return 0, 0
    return int(p.shndx[sym]), int(p.value[sym]) + addend


def _enable_site(em: Emitter, sec: int, pos: int, target: tuple[int, int, int, int] | None,
                 branch: int) -> str:
    """Write the jump-label site at patched ``sec+pos`` as an enabled key leaves it (6.1 x86
    ``jump_label_type()``: jump when enabled XOR branch): ``jmp`` to the entry's target for
    ``static_key_false`` sites (branch 0), a NOP otherwise. Returns why it cannot ("" when done)."""
    p = em.p
    if em.arch.machine != C.EM_X86_64:
        return f"rewriting jump labels is implemented for x86_64, not {em.arch.name}"
    if target is None or sec not in em.out_sec:
        return "the entry has no target in the included code"
    tsec, tpos = _field_place(p, target)
    out = em.cv.place(sec, pos, inside=True)
    tout = em.cv.place(tsec, tpos) if tsec == sec else None
    if out is None or tout is None:
        return "its target is not in the same included section"
    code = p.section_data(sec)[pos:pos + 5]
    if code[:1] == b"\xe9" or code == _X86_NOP5:
        width = 5
    elif code[:1] == b"\xeb" or code[:2] == _X86_NOP2:
        width = 2
    else:
        return f"unexpected instruction bytes {code.hex()} at the site"
    if branch:
        insn = _X86_NOP5 if width == 5 else _X86_NOP2
    else:
        rel = tout - (out + width)
        if width == 2 and not -128 <= rel < 128:
            return "its target is out of reach of a short jump"
        insn = b"\xe9" + rel.to_bytes(4, "little", signed=True) if width == 5 else \
            b"\xeb" + rel.to_bytes(1, "little", signed=True)
    em.w.patch_bytes(em.out_sec[sec], out, insn)
    return ""
