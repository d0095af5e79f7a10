"""Sections shared by several symbols: what one symbol of them is, on its own (used by select and emit).

Every explicit section attribute puts many symbols into one section: ``__read_mostly``
(``.data..read_mostly``), ``__ro_after_init``, ``.data..percpu``, ``__cacheline_aligned``, and for code
``__sched`` (``.sched.text``), ``__kprobes``, ``__lockfunc`` (``.spinlock.text``), ``.entry.text``,
``.noinstr.text``; so do ``.data``/``.bss``/``.text`` without ``-fdata-sections``/``-ffunction-sections``.
The live patch takes such a section one symbol at a time (klpforge/diff/emit/carve.py), so select follows the
references of the included symbols' bytes only.

The assembler resolves a branch or ``%rip``-relative access to a local symbol of the *same* section
without a relocation. :func:`resolved_refs` finds those with capstone and states them as relocations, so
that select follows them and emit can relocate them once the symbol is copied out of its section.

>>> [int(x["sym"]) for x in resolved_refs(obj, arch_for(62), sched_text, 0x20, 0x36)[0]]  # doctest: +SKIP
[3]
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..elf import constants as C
from ..elf.types import RELOC
from .arch import Arch
from .model import Object
from .secnames import is_special_section

__all__ = ["is_shared", "shared_sections", "gap", "place_of", "resolved_refs", "resolved_targets", "resolved_mismatch",
           "same_but_resolved", "same_but_relaxed"]

#: x86-64 R_X86_64_PC32 / R_X86_64_PLT32
_X86_PC32, _X86_PLT32 = 2, 4


def is_shared(obj: Object, arch: Arch, sec: int) -> bool:
    """True for a section taken symbol by symbol: it holds two or more function/object symbols, or one
    beside anonymous bytes (a jump table next to a named constant in ``.rodata``), all of them sized; not a
    special table, auxiliary code, a TOC or merged strings, which have rules of their own. Cached per
    object."""
    return bool(shared_sections(obj, arch)[sec])


def shared_sections(obj: Object, arch: Arch) -> np.ndarray:
    """:func:`is_shared` for every section of ``obj`` at once: bool array, shape (nsec,). Computed once per
    object with numpy over the symbols; only the few sections that pass the size tests have their names
    looked at."""
    got = obj.__dict__.get("_shared_sections")
    if got is not None:
        return got
    n = obj.nsec
    cnt = obj.member_count
    fo = np.flatnonzero(((obj.stype == C.STT_FUNC) | (obj.stype == C.STT_OBJECT)) & obj.defined & ~obj.is_prefix)
    unsized = np.bincount(obj.shndx[fo], weights=obj.size[fo] <= 0, minlength=n)[:n] > 0 if len(fo) \
        else np.zeros(n, bool)
    first = obj.first_member
    secsize = obj.shdrs["size"].astype(np.int64)
    alone = (cnt == 1) & ((obj.section_owner >= 0) | (obj.size[np.maximum(first, 0)] >= secsize))
    ok = (cnt > 0) & ~unsized & ~alone
    flags = obj.shdrs["flags"].astype(np.int64)
    for sec in np.flatnonzero(ok & ((flags & C.SHF_STRINGS) == 0)).tolist():
        name = obj.sec_names[sec]
        if is_special_section(name) or name in arch.toc_sections:
            ok[sec] = False
    ok &= (flags & C.SHF_STRINGS) == 0
    obj.__dict__["_shared_sections"] = ok
    return ok


def place_of(obj: Object, arch: Arch, rtype: int, addend: int, site: tuple[int, int]) -> int:
    """The byte a section-symbol relocation at ``site`` (section, offset) addresses in its target section:
    the addend, plus the architecture's PC-relative bias and any x86-64 immediate after the field when the
    relocation sits in code (``.long x - .`` in data has no instruction around it)."""
    if 0 < site[0] < obj.nsec and not obj.is_text(site[0]):
        return addend
    from .pcrel import pcrel_tail

    return addend + arch.pcrel_bias.get(rtype, 0) + pcrel_tail(obj, arch, site[0], site[1], rtype)


def gap(obj: Object, sec: int, where: int) -> tuple[int, int]:
    """The symbol-free byte range ``[lo, hi)`` around ``where`` in ``sec``: from the end of the symbol
    before to the start of the one after (the section's bounds when none)."""
    lo, hi = 0, int(obj.shdrs["size"][sec])
    for m in obj.syms_in_section.get(sec, []):
        v, e = int(obj.value[m]), int(obj.value[m]) + int(obj.size[m])
        if e <= where:
            lo = max(lo, e)
        elif v > where:
            hi = min(hi, v)
    return lo, hi


def resolved_refs(obj: Object, arch: Arch, sec: int, lo: int, hi: int) -> tuple[np.ndarray, list[str]]:
    """The references of code ``sec[lo:hi)`` that leave that range with no relocation, as relocations
    (a RELOC array: offset, target symbol, R_X86_64_PLT32 for branches / PC32 for data, addend), and the
    ones that cannot be stated so (one line each: a short jump, another architecture, no symbol there).
    Cached per (section, range)."""
    cache: dict[tuple[int, int, int], tuple[np.ndarray, list[str]]] = obj.__dict__.setdefault("_resolved", {})
    key = (sec, lo, hi)
    got = cache.get(key)
    if got is None:
        got = cache[key] = _find(obj, arch, sec, lo, hi)
    return got


def resolved_targets(obj: Object, arch: Arch, sec: int, lo: int, hi: int) -> np.ndarray:
    """Section offsets every PC-relative operand of code ``sec[lo:hi)`` reaches outside that range with no
    relocation (any field size: a ``jmp rel8`` tail call too), as an int64 array; cached per range. x86-64
    only: raises ValueError on other architectures, where capstone does not mark every PC-relative form."""
    if arch.machine != C.EM_X86_64:
        raise ValueError(f"{arch.name}: assembler-resolved references are not decoded")
    cache: dict[tuple[int, int, int], np.ndarray] = obj.__dict__.setdefault("_resolved_targets", {})
    got = cache.get((sec, lo, hi))
    if got is None:
        got = cache[(sec, lo, hi)] = _targets(obj, arch, sec, lo, hi)
    return got


def _targets(obj: Object, arch: Arch, sec: int, lo: int, hi: int) -> np.ndarray:
    # detail-free decoding (several times faster: every function of a shared .text may be decoded), the
    # operand read from capstone's text: ``0x1f0`` for a branch, ``[rip + 0x10]`` for data
    md = _LITE.get(arch.name)
    if md is None:
        import capstone

        md = _LITE[arch.name] = capstone.Cs(getattr(capstone, arch.cs_arch), _mode(capstone, arch.cs_mode))
    sites: list[int] = []
    ends: list[int] = []
    out: list[int] = []
    for a, n, mn, ops in md.disasm_lite(obj.section_data(sec)[lo:hi], lo):
        if mn.startswith(_BRANCHES) and ops[:1].isdigit():
            t = int(ops, 0)
        else:
            m = _RIP.search(ops)
            if m is None:
                continue
            t = a + n + (int(m.group(2), 0) if m.group(1) == "+" else -int(m.group(2), 0))
        if lo <= t < hi:
            continue
        sites.append(a)
        ends.append(a + n)
        out.append(t)
    if not out:
        return np.zeros(0, np.int64)
    roffs = obj.relocs(sec)["offset"].astype(np.int64)
    s_, e_ = np.array(sites, np.int64), np.array(ends, np.int64)
    k = np.searchsorted(roffs, s_)
    relocated = (k < len(roffs)) & (roffs[np.minimum(k, max(len(roffs) - 1, 0))] < e_) if len(roffs) \
        else np.zeros(len(s_), bool)
    return np.array(out, np.int64)[~relocated]


#: one detail-free decoder per architecture (building one costs more than decoding a small function)
_LITE: dict[str, Any] = {}
#: x86 mnemonics with a PC-relative immediate target (jmp, jcc, jrcxz, call, loop*, xbegin)
_BRANCHES = ("j", "call", "loop", "xbegin")
_RIP = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]")


def _find(obj: Object, arch: Arch, sec: int, lo: int, hi: int) -> tuple[np.ndarray, list[str]]:
    name = obj.sec_names[sec]
    if arch.machine != C.EM_X86_64:
        # capstone does not mark every PC-relative form as one on the others (s390 ``brasl``/``larl`` carry
        # no branch group, aarch64 ``adr``), so a resolved reference could go unseen: refuse instead
        f = obj.symbol_at(sec, lo)
        what = obj.sym_names[f] if f >= 0 else f"{name}+{lo:#x}"
        return np.zeros(0, RELOC), [f"{what} is in {name}, shared with code that stays in the running kernel; "
                                    f"on {arch.name} klpforge cannot find every reference the assembler resolved "
                                    "inside that section, so it cannot copy the function out alone: give it a "
                                    "section of its own"]
    import capstone

    md = capstone.Cs(getattr(capstone, arch.cs_arch), _mode(capstone, arch.cs_mode))
    md.detail = True
    code = obj.section_data(sec)
    roffs = obj.relocs(sec)["offset"].astype(np.int64)
    x86 = arch.machine == C.EM_X86_64
    rows: list[tuple[int, int, int, int]] = []
    problems: list[str] = []
    for insn in md.disasm(code[lo:hi], lo):
        a, n = int(insn.address), int(insn.size)
        target, field, fsize, kind = _pcrel_operand(capstone, insn, x86)
        if target is None or lo <= target < hi:
            continue
        k = int(np.searchsorted(roffs, a))
        if k < len(roffs) and roffs[k] < a + n:
            continue  # relocated: the linker computes it
        f = obj.symbol_at(sec, a)
        t = obj.symbol_at(sec, target)
        where = f"{obj.sym_names[f] if f >= 0 else name}+{a - (int(obj.value[f]) if f >= 0 else 0):#x}"
        if not x86 or fsize != 4 or t < 0:
            tname = obj.sym_names[t] if t >= 0 else f"{name}+{target:#x}"
            problems.append(f"{where} reaches {tname} in the shared section {name} through a displacement the "
                            "assembler resolved without a relocation, which cannot be kept when only the changed "
                            "symbols are copied out of that section: put the changed function in a section of "
                            "its own")
            continue
        rtype = _X86_PLT32 if kind == "branch" else _X86_PC32
        rows.append((a + field, t, rtype, target - int(obj.value[t]) - (n - field)))
    arr = np.zeros(len(rows), RELOC)
    if rows:
        arr["offset"], arr["sym"], arr["type"], arr["addend"] = zip(*rows, strict=True)
    return arr, problems


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


def same_but_resolved(orig: Object, patched: Object, o2p: np.ndarray, arch: Arch, osec: int, psec: int,
                      olo: int, ohi: int, plo: int, phi: int) -> bool:
    """True when code ``orig[osec][olo:ohi)`` and ``patched[psec][plo:phi)`` differ only in displacements the
    assembler resolved inside their shared sections, each reaching the correlated twin (``o2p``) of the same
    symbol at the same offset into it: the code did not change, only its neighbours moved (x86-64)."""
    if arch.machine != C.EM_X86_64 or ohi - olo != phi - plo:
        return False
    import capstone

    md = capstone.Cs(getattr(capstone, arch.cs_arch), _mode(capstone, arch.cs_mode))
    md.detail = True
    oc, pc = orig.section_data(osec), patched.section_data(psec)
    a = list(md.disasm(oc[olo:ohi], olo))
    b = list(md.disasm(pc[plo:phi], plo))
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if bytes(x.bytes) == bytes(y.bytes):
            continue
        if x.size != y.size or x.mnemonic != y.mnemonic:
            return False
        tx, fx, sx, _ = _pcrel_operand(capstone, x, True)
        ty, fy, sy, _ = _pcrel_operand(capstone, y, True)
        if tx is None or ty is None or (fx, sx) != (fy, sy) or sx != 4 or olo <= tx < ohi or plo <= ty < phi:
            return False
        if bytes(x.bytes)[:fx] != bytes(y.bytes)[:fy] or bytes(x.bytes)[fx + 4:] != bytes(y.bytes)[fy + 4:]:
            return False
        to, tp = orig.symbol_at(osec, tx), patched.symbol_at(psec, ty)
        if to < 0 or tp < 0 or int(o2p[to]) != tp or tx - int(orig.value[to]) != ty - int(patched.value[tp]):
            return False
    return True


def same_but_relaxed(orig: Object, patched: Object, o2p: np.ndarray, arch: Arch, osec: int, psec: int,
                     orange: tuple[int, int], prange: tuple[int, int], orelocs: np.ndarray,
                     prelocs: np.ndarray) -> bool:
    """True when code ``orig[osec][orange)`` and ``patched[psec][prange)`` are the same instructions, where a
    jump may have another encoding length (the assembler relaxes ``jmp rel8``/``rel32`` by distance, and a
    neighbour in the shared section moved) and every PC-relative operand the assembler resolved reaches the
    same place: the same instruction inside the function, or the correlated twin (``o2p``) of the same
    symbol at the same offset outside it. ``orelocs``/``prelocs``: each side's relocations as rows
    (offset from the range start, type, target key id, addend relative to the key), compared by instruction
    index. x86-64 only (GNU as relaxation); other architectures return False."""
    if arch.machine != C.EM_X86_64:
        return False
    import capstone

    md = capstone.Cs(getattr(capstone, arch.cs_arch), _mode(capstone, arch.cs_mode))
    md.detail = True
    (olo, ohi), (plo, phi) = orange, prange
    a = list(md.disasm(orig.section_data(osec)[olo:ohi], olo))
    b = list(md.disasm(patched.section_data(psec)[plo:phi], plo))
    if len(a) != len(b) or not a or sum(x.size for x in a) != ohi - olo or sum(y.size for y in b) != phi - plo:
        return False
    ostart = np.array([x.address for x in a] + [ohi], np.int64)
    pstart = np.array([y.address for y in b] + [phi], np.int64)
    if len(orelocs) != len(prelocs):
        return False
    relocated: set[int] = set()
    for ra, rb in zip(orelocs.tolist(), prelocs.tolist(), strict=True):
        ka = int(np.searchsorted(ostart, olo + ra[0], side="right")) - 1
        kb = int(np.searchsorted(pstart, plo + rb[0], side="right")) - 1
        if ka != kb or ra[1:] != rb[1:] or olo + ra[0] - ostart[ka] != plo + rb[0] - pstart[kb]:
            return False
        relocated.add(ka)
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        xb, yb = bytes(x.bytes), bytes(y.bytes)
        if k in relocated:  # the linker computes the field; the relocation rows agreed above
            if xb != yb:
                return False
            continue
        tx, fx, sx, kx = _pcrel_operand(capstone, x, True)
        ty, fy, sy, ky = _pcrel_operand(capstone, y, True)
        if tx is None or ty is None:
            if xb != yb or (tx is None) != (ty is None):
                return False
            continue
        if x.mnemonic != y.mnemonic or kx != ky:
            return False
        if x.size != y.size:
            if kx != "branch" or not x.mnemonic.startswith("j"):
                return False  # only jumps are relaxed
        elif xb[:fx] != yb[:fy] or xb[fx + sx:] != yb[fy + sy:]:
            return False
        inside_o, inside_p = olo <= tx < ohi, plo <= ty < phi  # the end is the next symbol: named below
        if inside_o != inside_p:
            return False
        if inside_o:  # the same instruction of the function, whatever moved in between
            io = int(np.searchsorted(ostart, tx))
            ip = int(np.searchsorted(pstart, ty))
            if io != ip or ostart[io] != tx or pstart[ip] != ty:
                return False
            continue
        to, tp = orig.symbol_at(osec, tx), patched.symbol_at(psec, ty)
        if to < 0 or tp < 0 or int(o2p[to]) != tp or tx - int(orig.value[to]) != ty - int(patched.value[tp]):
            return False
    return True


def resolved_mismatch(orig: Object, patched: Object, p2o: np.ndarray, arch: Arch, osec: int, psec: int,
                      orange: tuple[int, int], prange: tuple[int, int]) -> str | None:
    """For code whose bytes and relocations are equal: None when every reference the assembler resolved
    without a relocation (:func:`resolved_targets`) reaches, on both sides, correlated twins (``p2o``) at the
    same offset, else the first one that does not, described. Equal bytes can hide a new target: GCC placed
    another function at the old callee's offset (x86-64; None on other architectures, which are not
    decoded)."""
    if arch.machine != C.EM_X86_64 or _same_layout(orig, patched, p2o, osec, psec, prange[0] - orange[0]):
        return None
    ot = resolved_targets(orig, arch, osec, *orange)
    pt = resolved_targets(patched, arch, psec, *prange)
    if len(ot) != len(pt):
        return f"{len(ot)} -> {len(pt)} references resolved by the assembler"
    for a, b in zip(ot.tolist(), pt.tolist(), strict=True):
        tp = patched.symbol_at(psec, b)
        cands = [tp] if tp < 0 else [m for m in patched.syms_in_section.get(psec, [tp])
                                     if int(patched.value[m]) == int(patched.value[tp])] or [tp]
        ok = False
        for m in cands:
            oi = int(p2o[m]) if m >= 0 else -1
            if oi >= 0 and int(orig.shndx[oi]) == osec and a - int(orig.value[oi]) == b - int(patched.value[m]):
                ok = True
                break
        if not ok:
            what = patched.sym_names[tp] if tp >= 0 else f"{patched.sec_names[psec]}+{b:#x}"
            to = orig.symbol_at(osec, a)
            was = orig.sym_names[to] if to >= 0 else f"{orig.sec_names[osec]}+{a:#x}"
            return f"a reference the assembler resolved (same bytes) now reaches {what}, was {was}"
    return None


def _same_layout(orig: Object, patched: Object, p2o: np.ndarray, osec: int, psec: int, shift: int) -> bool:
    """True when every symbol of ``psec`` has its twin in ``osec`` ``shift`` bytes earlier and ``osec`` has
    no other symbols: equal bytes then reach twins wherever they point (the common case of an unchanged
    shared section, decided without decoding). Cached per (sections, shift)."""
    cache: dict[tuple[int, int, int], bool] = patched.__dict__.setdefault("_same_layout", {})
    key = (osec, psec, shift)
    got = cache.get(key)
    if got is None:
        pm = np.array(patched.syms_in_section.get(psec, []), np.int64)
        om = orig.syms_in_section.get(osec, [])
        tw = p2o[pm] if len(pm) else pm
        got = bool(len(pm) == len(om) and (tw >= 0).all() and (orig.shndx[tw] == osec).all()
                   and (patched.value[pm] - orig.value[tw] == shift).all() and len(set(tw.tolist())) == len(om))
        cache[key] = got
    return got
