"""The *emit* stage for Xen: one payload part per object, with ``.livepatch.funcs`` entries.

Xen has no klp relocations: everything the included code uses that stays in the hypervisor becomes an
undefined symbol named the way Xen's symbol table names it (``file#name`` for locals), which the
payload loader resolves by name (``xen/common/livepatch_elf.c: elf_resolve_symbols``, 4.17). Each
replaced function gets a ``struct livepatch_func`` (``xen/include/public/sysctl.h``, payload version 2,
104 bytes on x86_64): name, ``new_addr`` (relocated to our copy), ``old_addr`` 0 (Xen resolves
``name``), ``new_size``, ``old_size`` (from ``xen-syms``), version. Special tables (``.altinstructions``,
``.bug_frames.N``, ``.ex_table``) are cut to the entries of included code, as for Linux.

>>> part = emit_xen(corr, cmp, sel, arch, XenEmitOptions(xensyms))   # doctest: +SKIP
>>> [f.name for f in part.funcs]                                      # doctest: +SKIP
['evtchn_fifo_expand_array']
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..diff.arch import Arch
from ..diff.compare import Comparison
from ..diff.correlation import Correlation
from ..diff.emit.livepatch import EmitOptions, Emitter, Unresolvable, reloc_array
from ..diff.select import Selection, resolve_target
from ..elf import constants as C
from .syms import ENDBR64, XenSyms, xen_name

__all__ = ["XenEmitOptions", "XenFunc", "XenPart", "emit_xen", "FUNC_SIZE", "PAYLOAD_VERSION",
           "PATCH_INSN_SIZE", "XEN_RELOCS", "XEN_TABLES"]

#: ``sizeof(struct livepatch_func)`` and ``LIVEPATCH_PAYLOAD_VERSION`` in Xen 4.17's public/sysctl.h.
FUNC_SIZE = 104
PAYLOAD_VERSION = 2
#: ``ARCH_PATCH_INSN_SIZE`` (x86 ``jmp rel32``); plus 4 when the old function starts with endbr64.
PATCH_INSN_SIZE = 5
#: Relocation types Xen 4.17's x86 loader applies (``arch/x86/livepatch.c``): NONE, 64, PC32, PLT32.
XEN_RELOCS = frozenset({0, 1, 2, 4})
#: ``.altinstructions`` entry: struct alt_instr, 14 bytes (``xen/arch/x86/include/asm/alternative.h``).
XEN_ENV = {"ALT_STRUCT_SIZE": "14"}
_R_X86_64_64 = 1
#: Per-site tables Xen 4.17 registers for a payload (``xen/common/livepatch.c: prepare_payload``).
XEN_TABLES = frozenset({".altinstructions", ".ex_table", ".bug_frames.0", ".bug_frames.1", ".bug_frames.2",
                        ".bug_frames.3"})


@dataclass
class XenEmitOptions:
    xensyms: XenSyms


@dataclass(frozen=True)
class XenFunc:
    """One ``livepatch_func``: Xen-form name of the replaced function, sizes in bytes, our symbol."""

    name: str
    new_symbol: str
    new_size: int
    old_size: int
    old_addr: int


@dataclass
class XenPart:
    """The emitted object for one source object, what it replaces, and what it refused."""

    data: bytes
    funcs: list[XenFunc]
    externals: list[str]
    special_kept: dict[str, tuple[int, int]]
    refusals: list[str]


class _XenEmitter(Emitter):
    def __init__(self, corr: Correlation, cmp: Comparison, sel: Selection, arch: Arch, xs: XenSyms):
        super().__init__(corr, cmp, sel, arch, EmitOptions("xen", None, None, XEN_ENV))  # type: ignore[arg-type]
        self.xs = xs

    def xen_name_of(self, oi: int) -> str:
        o = self.corr.orig
        sc = int(o.scope[oi])
        file = o.file_names[sc] if sc >= 0 else o.main_file
        return xen_name(o.sym_names[oi], file, bool(o.sbind[oi] == C.STB_LOCAL))

    def resolve(self, sym: int, rtype: int, addend: int, site: tuple[int, int] | None = None,
                dry: bool = False) -> tuple[int, int, str | None, str]:
        # ``dry`` (classify only) is for Linux's module-keyed tables; Xen payloads never have klp relocations
        p = self.p
        if sym == 0:
            return 0, addend, None, ""
        if rtype not in XEN_RELOCS:
            raise Unresolvable(f"relocation type {rtype}, which Xen's payload loader does not apply")
        t, a = resolve_target(p, self.arch, sym, rtype, addend, site)
        if p.stype[t] == C.STT_SECTION:
            ps = int(p.shndx[t])
            if ps in self.out_sec:
                bias = self.arch.pcrel_bias.get(rtype, 0)
                new = self.cv.place(ps, addend + bias)
                if new is not None:  # in a carved shared section: where the kept bytes now are
                    return self.secsym[self.out_sec[ps]], new - bias, None, p.sec_names[ps]
            raise Unresolvable(f"{p.sec_names[ps]}+{addend:#x}, which is not included")
        if t in self.out_sym:
            return self.out_sym[t], a, None, p.sym_names[t]
        if not p.defined[t]:
            name = p.sym_names[t]
            if self.xs.lookup(name) is None:
                raise Unresolvable(f"{name}, which the running hypervisor's symbol table does not have")
            return self.external(name), a, None, name
        oi = self.orig_of(t)
        if oi < 0:
            raise Unresolvable(f"{p.sym_names[t]}, which is neither included nor in the original object")
        name = self.xen_name_of(oi)
        if self.xs.lookup(name) is None:
            raise Unresolvable(f"{name}, which the running hypervisor's symbol table does not have "
                                "(inlined or dropped in its build)")
        return self.external(name), a, None, name


def emit_xen(corr: Correlation, cmp: Comparison, sel: Selection, arch: Arch, opts: XenEmitOptions) -> XenPart:
    """Build one payload part (an ``ET_REL`` object) from a selection; refusals are returned, not raised."""
    em = _XenEmitter(corr, cmp, sel, arch, opts.xensyms)
    p = corr.patched
    sections, specials = em.lay_out(labels_local=True)
    for name, _d, _r, _t, nkept in specials.values():
        if name not in XEN_TABLES:
            em.refusals.append(f"{name}: {nkept} entries for included code, but Xen 4.17's payload loader "
                               "does not register this table (prepare_payload), so they would not work")
    funcs: list[XenFunc] = []
    for s in sel.patched:
        oi = em.orig_of(s)
        if oi < 0:
            continue
        name = em.xen_name_of(oi)
        old = opts.xensyms.lookup(name)
        osize = int(corr.orig.size[oi])
        if old is None:
            em.refusals.append(f"{name}: not in the running hypervisor's symbol table (xen-syms), "
                               "so Xen cannot find the function to replace")
            continue
        if old.size != osize:
            em.refusals.append(f"{name}: {osize} bytes in the rebuilt original object but {old.size} in "
                               "xen-syms: the source or configuration does not match the running hypervisor")
            continue
        need = PATCH_INSN_SIZE + (len(ENDBR64) if opts.xensyms.code(old.addr, 4) == ENDBR64 else 0)
        if old.size < need:
            em.refusals.append(f"{name}: only {old.size} bytes long, too short for the {need}-byte jump Xen "
                               "writes over its start (arch/x86/livepatch.c)")
            continue
        funcs.append(XenFunc(name, p.sym_names[s], int(p.size[s]), old.size, old.addr))
    kept = em.relocate_all(sections, specials)
    if funcs:
        _funcs_section(em, funcs, {p.sym_names[s]: s for s in sel.patched})
    return XenPart(em.w.build(), funcs, sorted(em.ext), kept, em.refusals)


def _funcs_section(em: _XenEmitter, funcs: list[XenFunc], by_name: dict[str, int]) -> None:
    """``.livepatch.strings`` with the names and ``.livepatch.funcs`` pointing at them and our copies."""
    strings = bytearray()
    offs = []
    for f in funcs:
        offs.append(len(strings))
        strings += f.name.encode() + b"\0"
    sh = em.w.add_section(".livepatch.strings", C.SHT_PROGBITS, C.SHF_ALLOC, bytes(strings), addralign=1)
    ssym = em.w.add_symbol("", sh, 0, 0, C.STT_SECTION, C.STB_LOCAL)
    blob = bytearray()
    relocs = []
    for i, f in enumerate(funcs):
        base = i * FUNC_SIZE
        # name, new_addr, old_addr, new_size, old_size, version, _pad[39], expect (disabled)
        blob += struct.pack("<QQQIIB", 0, 0, 0, f.new_size, f.old_size, PAYLOAD_VERSION)
        blob += bytes(FUNC_SIZE - 33)
        relocs.append((base, ssym, _R_X86_64_64, offs[i]))
        relocs.append((base + 8, em.out_sym[by_name[f.new_symbol]], _R_X86_64_64, 0))
    fh = em.w.add_section(".livepatch.funcs", C.SHT_PROGBITS, C.SHF_ALLOC, bytes(blob), addralign=8)
    em.w.add_relocations(fh, reloc_array(relocs), rela=True)
