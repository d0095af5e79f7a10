"""Per-symbol inclusion from sections shared by several symbols (the *emit* stage's first step).

A section an explicit attribute (``__read_mostly``, ``__sched`` ...) or a build without
``-fdata-sections``/``-ffunction-sections`` shares among symbols (klpforge/diff/sharedsec.py) is not copied
whole: that would copy its unchanged neighbours, and the patched code would read and call the copies
instead of the running kernel's objects. It keeps its name (the module loader treats ``.data..percpu`` and
``.data..ro_after_init`` by name) but holds only the included symbols' bytes (and the anonymous bytes they
address), each at an offset aligned as the section is; every other reference into it stays a reference
to the running kernel's symbol.

The assembler resolves a branch or ``%rip``-relative access to a local symbol of the *same* section
without a relocation; once the section is carved such a displacement would point at garbage. Those get a
relocation (x86-64, klpforge/diff/sharedsec.py); on other architectures the diff refuses instead.

>>> cv = carve(p, arch, sel, set(sel.sections))
>>> cv.place(p.find_section(".data..read_mostly"), 0)  # knob_hits, the one new variable
0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ...elf import constants as C
from ...util.arrays import isin
from ..arch import Arch
from ..model import Object
from ..secnames import is_aux_code
from ..select import Selection, resolve_target
from ..sharedsec import gap, is_shared, place_of, resolved_refs

__all__ = ["Carving", "carve", "carve_aux"]


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


def carve(p: Object, arch: Arch, sel: Selection, candidates: set[int]) -> Carving:
    """Carve every section of ``candidates`` that holds a function/object symbol the live patch does not
    include (see the module docstring). Errors: none raised; what cannot be carved safely is returned in
    :attr:`Carving.refusals`."""
    cv = Carving()
    shared = [s for s in sorted(candidates) if is_shared(p, arch, s)
              and any(m not in sel.included for m in p.syms_in_section[s])]
    if not shared:
        return cv
    anon = _anonymous_places(p, arch, sel, set(shared))
    for sec in shared:
        # a function comes with the padding/prefix in front of it (model.Object.pad_start), which starts
        # aligned as the function is (-falign-functions=16, 16 bytes of padding), so it stays aligned
        keep = [p.code_range(m) if m in p.pad_start else (int(p.value[m]), int(p.value[m]) + int(p.size[m]))
                for m in p.syms_in_section[sec] if m in sel.included]
        keep += [gap(p, sec, w) for w in anon.get(sec, ())]
        _lay_out(cv, p, sec, _merged(keep))
        if p.is_text(sec):
            extra = cv.extra.setdefault(sec, [])
            for m in p.syms_in_section[sec]:
                if m in sel.included:
                    refs, problems = resolved_refs(p, arch, sec, int(p.value[m]), int(p.value[m]) + int(p.size[m]))
                    cv.refusals.extend(problems)
                    extra.extend(zip(refs["offset"].tolist(), refs["sym"].tolist(), refs["type"].tolist(),
                                     refs["addend"].tolist(), strict=True))
            if extra and cv.data[sec]:
                # x86 (6.1 arch/x86/kernel/module.c) refuses to relocate a field that is not zero
                buf = bytearray(cv.data[sec])
                for off, *_ in extra:
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
        hit = r[isin(r["sym"].astype(np.int64), list(sec_syms))]
        if is_shared(p, arch, src):  # only what the included symbols' own bytes reference
            mine = np.zeros(len(hit), bool)
            for m in p.syms_in_section[src]:
                if m in sel.included:
                    v = int(p.value[m])
                    mine |= (hit["offset"] >= v) & (hit["offset"] < v + int(p.size[m]))
            hit = hit[mine]
        for x in hit:
            s, t_, a, off = int(x["sym"]), int(x["type"]), int(x["addend"]), int(x["offset"])
            t, _ = resolve_target(p, arch, s, t_, a, (src, off))
            if p.stype[t] == C.STT_SECTION:
                out.setdefault(sec_syms[s], set()).add(place_of(p, arch, t_, a, (src, off)))
    return out


def carve_aux(p: Object, arch: Arch, sections: set[int],
              tables: list[tuple[str, bytes, list[tuple[int, int, int, int]], int]], cv: Carving) -> None:
    """Cut the auxiliary code sections of ``sections`` (``.altinstr_replacement``, ``.altinstr_aux``,
    ``.fixup``, ppc64 ``__ftr_alt_*``: selection.AUX_CODE) to the pieces that included code and the kept
    special-table entries use, instead of carrying every piece of the object with its relocations into
    unrelated (even ``__init``) functions.

    A piece runs from a place anything in the object references (a table entry's replacement, a
    ``jmp 6f`` of ``static_cpu_has()`` into ``.altinstr_aux``, 6.1 ``arch/x86/include/asm/cpufeature.h``)
    to the next such place. Kept pieces: those referenced by included code (inside its kept bytes) or by
    ``tables`` (the kept entries: ``(name, bytes, relocations (offset, patched symbol, type, addend),
    entry size)``), and what kept pieces reference in turn. An x86 ``.altinstructions`` entry keeps exactly
    its ``replacementlen`` bytes (6.1 ``struct alt_instr``: byte 11; 6.3+: byte 13 of 14): an empty
    replacement (``ALTERNATIVE_TERNARY``'s "") starts where the next site's replacement does and must not
    bring it along. Fills ``cv`` like :func:`carve` (ranges, data, size)."""
    aux = {s for s in sections if is_aux_code(p.sec_names[s]) and s not in cv.ranges}
    if not aux:
        return
    starts: dict[int, set[int]] = {s: {0} for s in aux}
    used: dict[int, set[int]] = {s: set() for s in aux}
    refs_from: dict[int, list[tuple[int, int, int]]] = {s: [] for s in aux}  # aux sec -> (offset, sec, place)

    def target(sym: int, rtype: int, addend: int, code: bool) -> tuple[int, int]:
        if not p.defined[sym]:
            return 0, 0
        sec = int(p.shndx[sym])
        if sec not in aux:
            return 0, 0
        return sec, int(p.value[sym]) + addend + (arch.pcrel_bias.get(rtype, 0) if code else 0)

    for src in range(1, p.nsec):
        r = p.relocs(src)
        if not len(r):
            continue
        code = p.is_text(src)
        syms = r["sym"].astype(np.int64)
        hit = r[isin(p.shndx[syms], list(aux)) & p.defined[syms]]
        for x in hit:
            off = int(x["offset"])
            sec, where = target(int(x["sym"]), int(x["type"]), int(x["addend"]), code)
            if not sec:
                continue
            starts[sec].add(where)
            if src in aux:
                refs_from[src].append((off, sec, where))
            elif src in sections and not is_aux_code(p.sec_names[src]) \
                    and cv.place(src, off, inside=True) is not None:
                used[sec].add(where)
    exact: dict[int, list[tuple[int, int]]] = {s: [] for s in aux}
    for name, data, entries, size in tables:
        lenoff = {12: 11, 13: 11, 14: 13}.get(size, -1) \
            if name == ".altinstructions" and arch.machine == C.EM_X86_64 else -1
        for off, sym, rtype, addend in entries:
            sec, where = target(sym, rtype, addend, False)
            if not sec:
                continue
            if lenoff >= 0 and off % size == 4:  # repl_offset: the replacement is [where, where + len)
                exact[sec].append((where, where + data[off - 4 + lenoff]))
            else:
                used[sec].add(where)
    pieces = {s: np.array(sorted(starts[s] | {int(p.shdrs["size"][s])}), np.int64) for s in aux}

    def piece(sec: int, where: int) -> tuple[int, int]:
        b = pieces[sec]
        k = int(np.searchsorted(b, where, side="right")) - 1
        return int(b[k]), int(b[min(k + 1, len(b) - 1)])

    keep: dict[int, set[tuple[int, int]]] = {s: set(exact[s]) for s in aux}
    todo = [(s, w) for s in aux for w in used[s]]
    todo += [(t, w) for s in aux for lo, hi in exact[s] for off, t, w in refs_from[s] if lo <= off < hi]
    while todo:
        sec, where = todo.pop()
        pc = piece(sec, where)
        if pc in keep[sec] or pc[0] >= pc[1]:
            continue
        keep[sec].add(pc)
        todo.extend((t, w) for off, t, w in refs_from[sec] if pc[0] <= off < pc[1])
    for sec in sorted(aux):
        merged = _merged(keep[sec])
        if merged == [[0, int(p.shdrs["size"][sec])]]:
            continue  # every piece is used: the section goes whole
        _lay_out(cv, p, sec, merged)


def _merged(ranges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """``[lo, hi)`` byte ranges sorted, overlapping or touching ones joined."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _lay_out(cv: Carving, p: Object, sec: int, merged: list[list[int]]) -> None:
    """Record in ``cv`` the kept ``merged`` ranges of ``sec`` placed one after another at the section's
    alignment (``ranges``: old start, old end, new start), the carved size, and the carved bytes (none for
    ``SHT_NOBITS``)."""
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
        return
    src = p.section_data(sec)
    buf = bytearray(pos)
    for lo, hi, new in rows:
        buf[new:new + hi - lo] = src[lo:hi]
    cv.data[sec] = bytes(buf)
