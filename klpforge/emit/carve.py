"""Per-symbol inclusion from sections shared by several symbols (the *emit* stage's first step).

Every explicit section attribute puts many symbols into one section: ``__read_mostly``
(``.data..read_mostly``), ``__ro_after_init``, ``.data..percpu``, ``__cacheline_aligned``, and for code
``__sched`` (``.sched.text``), ``__kprobes``, ``__lockfunc`` (``.spinlock.text``), ``.entry.text``,
``.noinstr.text``; so do ``.data``/``.bss``/``.text`` without ``-fdata-sections``/``-ffunction-sections``.
Copying such a section whole would copy its unchanged neighbours, and the patched code would read and call
the copies instead of the running kernel's objects. A shared section keeps its name (the module loader
treats ``.data..percpu`` and ``.data..ro_after_init`` by name) but holds only the included symbols' bytes
(and the anonymous bytes included code addresses), each at an offset aligned as the section is; every
other reference into it stays a reference to the running kernel's symbol.

The assembler resolves a branch or ``%rip``-relative access to a local symbol of the *same* section
without a relocation; once the section is carved such a displacement would point at garbage. Those are
found with capstone and given a relocation (x86-64); on other architectures the diff refuses instead.

>>> cv = carve(p, arch, sel, set(sel.sections))
>>> cv.place(p.find_section(".data..read_mostly"), 0)  # knob_hits, the one new variable
0
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..arch import Arch
from ..elf import constants as C
from ..model import Object
from ..select import Selection, is_aux_code, is_special_section, resolve_target

__all__ = ["Carving", "carve"]

#: x86-64 R_X86_64_PC32 / R_X86_64_PLT32
_X86_PC32, _X86_PLT32 = 2, 4


@dataclass
class Carving:
    """The carved sections: per patched section, kept ranges ``(lo, hi, new_lo)`` (bytes, sorted by
    ``lo``), the new contents and size, and relocations to add (patched offsets)."""

    ranges: dict[int, np.ndarray] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    size: dict[int, int] = field(default_factory=dict)
    extra: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)

    def place(self, sec: int, off: int, inside: bool = False) -> int | None:
        """Output offset of patched ``sec+off`` (unchanged for a section not carved; None when carved away).
        One past a kept range's end counts for it (``&array[N]``) unless ``inside`` (a relocation's own
        place must lie within the kept bytes)."""
        r = self.ranges.get(sec)
        if r is None:
            return off
        k = int(np.searchsorted(r[:, 0], off, side="right")) - 1
        if k >= 0 and int(r[k, 0]) <= off and (off < int(r[k, 1]) or (off == int(r[k, 1]) and not inside)):
            return off - int(r[k, 0]) + int(r[k, 2])
        return None


def _carvable(p: Object, arch: Arch, sec: int) -> bool:
    name = p.sec_names[sec]
    return not (is_special_section(name) or is_aux_code(name) or name in arch.toc_sections
                or p.section_flags(sec) & C.SHF_STRINGS)


def carve(p: Object, arch: Arch, sel: Selection, candidates: set[int]) -> Carving:
    """Carve every section of ``candidates`` that holds a function/object symbol the live patch does not
    include (see the module docstring). Errors: none raised; what cannot be carved safely is returned in
    :attr:`Carving.refusals`."""
    cv = Carving()
    shared = [s for s in sorted(candidates) if p.syms_in_section.get(s)
              and any(m not in sel.included for m in p.syms_in_section[s]) and _carvable(p, arch, s)]
    if not shared:
        return cv
    anon = _anonymous_places(p, arch, sel, set(shared))
    for sec in shared:
        keep = [(int(p.value[m]), int(p.value[m]) + int(p.size[m])) for m in p.syms_in_section[sec]
                if m in sel.included]
        keep += [_gap(p, sec, w) for w in anon.get(sec, ())]
        keep.sort()
        merged: list[list[int]] = []
        for lo, hi in keep:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        align = max(int(p.shdrs["addralign"][sec]), 1)
        rows, pos = [], 0
        for lo, hi in merged:
            pos = -(-pos // align) * align
            rows.append((lo, hi, pos))
            pos += hi - lo
        cv.ranges[sec] = np.array(rows, np.int64).reshape(-1, 3)
        cv.size[sec] = pos
        if int(p.shdrs["type"][sec]) == C.SHT_NOBITS:
            cv.data[sec] = b""
        else:
            src = p.section_data(sec)
            buf = bytearray(pos)
            for lo, hi, new in rows:
                buf[new:new + hi - lo] = src[lo:hi]
            cv.data[sec] = bytes(buf)
        if p.is_text(sec):
            _resolved_references(p, arch, sec, cv)
            if cv.extra.get(sec) and cv.data[sec]:
                # x86 (6.1 arch/x86/kernel/module.c) refuses to relocate a field that is not zero
                buf = bytearray(cv.data[sec])
                for off, *_ in cv.extra[sec]:
                    at = cv.place(sec, off, inside=True)
                    if at is not None:
                        buf[at:at + 4] = bytes(4)
                cv.data[sec] = bytes(buf)
    return cv


def _anonymous_places(p: Object, arch: Arch, sel: Selection, shared: set[int]) -> dict[int, set[int]]:
    """Places in ``shared`` sections that included code or data references without a covering symbol
    (an anonymous jump table or constant beside named objects): their bytes must come along."""
    out: dict[int, set[int]] = {}
    sec_syms = {int(p.section_symbol[s]): s for s in shared if p.section_symbol[s] >= 0}
    if not sec_syms:
        return out
    for src in sel.sections:
        r = p.relocs(src)
        hit = r[np.isin(r["sym"].astype(np.int64), list(sec_syms))]
        for x in hit:
            s, t_, a, off = int(x["sym"]), int(x["type"]), int(x["addend"]), int(x["offset"])
            t, _ = resolve_target(p, arch, s, t_, a, (src, off))
            if p.stype[t] == C.STT_SECTION:
                out.setdefault(sec_syms[s], set()).add(a + arch.pcrel_bias.get(t_, 0))
    return out


def _gap(p: Object, sec: int, where: int) -> tuple[int, int]:
    """The symbol-free byte range around ``where``: from the end of the symbol before to the start of the
    one after (the section's bounds when none)."""
    lo, hi = 0, int(p.shdrs["size"][sec])
    for m in p.syms_in_section.get(sec, []):
        v, e = int(p.value[m]), int(p.value[m]) + int(p.size[m])
        if e <= where:
            lo = max(lo, e)
        elif v > where:
            hi = min(hi, v)
    return lo, hi


def _resolved_references(p: Object, arch: Arch, sec: int, cv: Carving) -> None:
    """Find branches and ``%rip``-relative accesses of the kept code that leave their kept range with no
    relocation (the assembler resolved them inside the section); relocate them (x86-64) or refuse."""
    name = p.sec_names[sec]
    rows = cv.ranges[sec]
    if not arch.cs_arch:
        cv.refusals.append(f"{name} is shared with functions that stay in the running kernel, and klpforge "
                           f"cannot decode {arch.name} code to check the branches between them: put the "
                           "changed function in a section of its own")
        return
    import capstone

    md = capstone.Cs(getattr(capstone, arch.cs_arch), _mode(capstone, arch.cs_mode))
    md.detail = True
    code = p.section_data(sec)
    roffs = p.relocs(sec)["offset"].astype(np.int64)
    x86 = arch.machine == C.EM_X86_64
    extra = cv.extra.setdefault(sec, [])
    for lo, hi, _new in rows.tolist():
        for insn in md.disasm(code[lo:hi], lo):
            a, n = int(insn.address), int(insn.size)
            target, field, fsize, kind = _pcrel_operand(capstone, insn, x86)
            if target is None or lo <= target < hi:
                continue
            k = int(np.searchsorted(roffs, a))
            if k < len(roffs) and roffs[k] < a + n:
                continue  # relocated: the linker computes it
            f = p.symbol_at(sec, a)
            t = p.symbol_at(sec, target)
            where = f"{p.sym_names[f] if f >= 0 else name}+{a - (int(p.value[f]) if f >= 0 else 0):#x}"
            tname = p.sym_names[t] if t >= 0 else f"{name}+{target:#x}"
            if not x86 or fsize != 4 or t < 0:
                cv.refusals.append(f"{where} reaches {tname} in the shared section {name} through a displacement "
                                   "the assembler resolved without a relocation, which cannot be kept when only "
                                   "the changed symbols are copied out of that section: put the changed "
                                   "function in a section of its own")
                continue
            rtype = _X86_PLT32 if kind == "branch" else _X86_PC32
            extra.append((a + field, t, rtype, target - int(p.value[t]) - (a + n - (a + field))))


def _mode(capstone: object, spec: str) -> int:
    mode = 0
    for part in spec.split("|"):
        if part.strip():
            mode |= getattr(capstone, part.strip())
    return mode


def _pcrel_operand(capstone: object, insn: object, x86: bool) -> tuple[int | None, int, int, str]:
    """(absolute target, field offset in the instruction, field size, 'branch'/'data') of a PC-relative
    operand of ``insn``, or (None, 0, 0, '') when it has none."""
    groups = set(insn.groups)  # type: ignore[attr-defined]
    ops = insn.operands  # type: ignore[attr-defined]
    if groups & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL}:  # type: ignore[attr-defined]
        for op in ops:
            if op.type == capstone.CS_OP_IMM:  # type: ignore[attr-defined]
                if x86:
                    return int(op.imm), int(insn.imm_offset), int(insn.imm_size), "branch"  # type: ignore[attr-defined]
                return int(op.imm), 0, 0, "branch"
    if x86:
        from capstone import x86 as cx86

        for op in ops:
            if op.type == capstone.CS_OP_MEM and op.mem.base == cx86.X86_REG_RIP:  # type: ignore[attr-defined]
                tgt = int(insn.address) + int(insn.size) + int(op.mem.disp)  # type: ignore[attr-defined]
                return tgt, int(insn.disp_offset), int(insn.disp_size), "data"  # type: ignore[attr-defined]
    return None, 0, 0, ""
