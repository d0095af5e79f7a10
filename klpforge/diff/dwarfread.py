"""DWARF of a relocatable object, read fast: pyelftools over debug sections relocated with numpy.

pyelftools applies an object's ``.rela.debug_*`` relocations one by one in Python (12 s of CPU for the
45,000 of 6.1's ``fs/ext4/super.o`` built with Debian's config); here they are applied in one numpy
scatter per section and pyelftools parses the result (0.2 s to open that object: bench/bench_dwarf.py).
Values are ``S + A`` with ``S`` the symbol's ``st_value``: in a relocatable object every address is then
relative to its own section, which is what the callers compare.

Also here: :func:`clone_line_regs`, the register in which a GCC clone of a line-taking helper
(``__check_block_validity.constprop.0`` of 6.1 ``fs/ext4/inode.c``) receives its ``__LINE__`` argument,
read from the clone's DWARF (the concrete ``DW_TAG_subprogram`` whose ``DW_AT_abstract_origin`` is the
helper; its ``DW_TAG_formal_parameter`` for the helper's line parameter, located at the clone's entry).
"""

from __future__ import annotations

import io
import re
import weakref
from typing import Any

import numpy as np

from ..elf import constants as C
from .model import Object

__all__ = ["dwarf_info", "addr_target", "clone_base", "clone_line_regs", "DWARF_REGS"]

#: Relocation types found in debug sections, per ELF machine: type -> width in bytes (absolute ``S + A``).
_ABS: dict[int, dict[int, int]] = {
    C.EM_X86_64: {1: 8, 10: 4, 11: 4},  # R_X86_64_64, _32, _32S
    C.EM_AARCH64: {257: 8, 258: 4, 259: 2},  # R_AARCH64_ABS64, ABS32, ABS16
    C.EM_PPC64: {38: 8, 1: 4},  # R_PPC64_ADDR64, ADDR32
    C.EM_S390: {22: 8, 4: 4},  # R_390_64, R_390_32
}


def _reg_names(machine: int) -> dict[int, str]:
    """DWARF register number -> canonical register name (the psABI tables: x86-64 psABI 3.38, AAPCS64
    DWARF, ELFv2 and s390x ELF ABI)."""
    if machine == C.EM_X86_64:
        return dict(enumerate(("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp",
                               "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")))
    if machine == C.EM_AARCH64:
        return {n: f"x{n}" for n in range(31)}
    if machine in (C.EM_PPC64, C.EM_S390):
        return {n: f"r{n}" for n in range(32 if machine == C.EM_PPC64 else 16)}
    return {}


#: DWARF register numbers per ELF machine.
DWARF_REGS: dict[int, dict[int, str]] = {m: _reg_names(m) for m in _ABS}

#: A GCC IPA clone of a named function: ``foo.constprop.0``, ``foo.isra.0``, ``foo.part.0.constprop.0``.
_CLONE = re.compile(r"^([A-Za-z_]\w*)(?:\.(?:constprop|isra|part)\.\d+)+$")


def clone_base(name: str) -> str:
    """The function a GCC IPA clone was made from ('' when ``name`` is not such a clone)."""
    m = _CLONE.match(name)
    return m.group(1) if m else ""


_cache: weakref.WeakKeyDictionary[Object, Any] = weakref.WeakKeyDictionary()


def _relocated(obj: Object, sec: int) -> bytes:
    """Bytes of debug section ``sec`` with its relocations applied (``S + A``, in the object's byte order);
    relocation types not listed in :data:`_ABS` are left as they are."""
    data = np.frombuffer(bytearray(obj.section_data(sec)), np.uint8).copy()
    widths = _ABS.get(int(obj.elf.machine), {})
    r = obj.relocs(sec)
    if not len(r) or not widths:
        return data.tobytes()
    val = obj.value[r["sym"].astype(np.int64)] + r["addend"].astype(np.int64)
    typ = r["type"].astype(np.int64)
    order = obj.elf.endian
    for t, w in widths.items():
        m = typ == t
        if not m.any():
            continue
        off = r["offset"].astype(np.int64)[m]
        ok = off + w <= len(data)
        v = val[m][ok].astype(np.dtype(f"u{w}").newbyteorder(order) if w > 1 else np.uint8)
        idx = off[ok][:, None] + np.arange(w)
        data[idx] = v.view(np.uint8).reshape(-1, w)
    return data.tobytes()


def dwarf_info(obj: Object) -> Any:
    """pyelftools ``DWARFInfo`` of ``obj`` with relocations applied fast, or None without ``.debug_info``
    (cached per object)."""
    if obj in _cache:
        return _cache[obj]
    if obj.find_section(".debug_info") is None or obj.find_section(".debug_abbrev") is None:
        _cache[obj] = None
        return None
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor
    from elftools.elf.elffile import ELFFile

    class _Fast(ELFFile):
        def _read_dwarf_section(self, section: Any, relocate_dwarf_sections: bool) -> Any:
            sec = obj.find_section(section.name)
            data = _relocated(obj, sec) if sec is not None else section.data()
            return DebugSectionDescriptor(stream=io.BytesIO(data), name=section.name,
                                          global_offset=section["sh_offset"], size=len(data),
                                          address=section["sh_addr"])

    try:
        info = _Fast(io.BytesIO(bytes(obj.elf.data))).get_dwarf_info(relocate_dwarf_sections=False,
                                                                    follow_links=False)
    except Exception:  # damaged or unsupported DWARF: callers treat it as absent (conservative)
        info = None
    _cache[obj] = info
    return info


def addr_target(obj: Object, attr_offset: int) -> tuple[int, int]:
    """(section index, offset in it) that the address attribute stored at ``attr_offset`` of
    ``.debug_info`` relocates to; (-1, -1) when no relocation is there."""
    sec = obj.find_section(".debug_info")
    if sec is None:
        return -1, -1
    r = obj.relocs(sec)
    k = int(np.searchsorted(r["offset"], attr_offset))
    if k >= len(r) or int(r["offset"][k]) != attr_offset:
        return -1, -1
    s = int(r["sym"][k])
    return int(obj.shndx[s]), int(obj.value[s]) + int(r["addend"][k])


def _entry_reg(info: Any, die: Any, low_pc: int, regs: dict[int, str]) -> str:
    """The register a parameter DIE is in at the function's entry ``low_pc`` ('' when not one register)."""
    attr = die.attributes.get("DW_AT_location")
    if attr is None:
        return ""
    if attr.form == "DW_FORM_exprloc" or attr.form.startswith("DW_FORM_block"):
        return _one_reg(bytes(attr.value), regs)
    try:
        entries = info.location_lists().get_location_list_at_offset(attr.value, die=die)
    except Exception:
        return ""
    base = int(die.cu.get_top_DIE().attributes.get("DW_AT_low_pc").value) \
        if "DW_AT_low_pc" in die.cu.get_top_DIE().attributes else 0
    for e in entries:
        if hasattr(e, "base_address"):
            base = int(e.base_address)
            continue
        if not hasattr(e, "loc_expr"):
            continue
        begin = int(e.begin_offset) if getattr(e, "is_absolute", False) else base + int(e.begin_offset)
        end = int(e.end_offset) if getattr(e, "is_absolute", False) else base + int(e.end_offset)
        if begin <= low_pc < end:
            return _one_reg(bytes(e.loc_expr), regs)
    return ""


def _one_reg(expr: bytes, regs: dict[int, str]) -> str:
    """The register of a location expression that is exactly one ``DW_OP_reg<n>``/``DW_OP_regx``."""
    if len(expr) == 1 and 0x50 <= expr[0] <= 0x6F:
        return regs.get(expr[0] - 0x50, "")
    if len(expr) >= 2 and expr[0] == 0x90:
        n, shift, i = 0, 0, 1
        while i < len(expr):
            n |= (expr[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not expr[i - 1] & 0x80:
                break
        return regs.get(n, "") if i == len(expr) else ""
    return ""


def clone_line_regs(obj: Object, line_args: dict[str, int]) -> dict[str, str]:
    """For each local GCC clone in ``obj`` of a helper of ``line_args`` (name -> 1-based position of its
    line parameter, klpforge/diff/lineargs.py ``LINE_ARGS``): the canonical register its line argument arrives
    in, read from DWARF (empty without DWARF or when a clone's line parameter is not one register at its
    entry: it was propagated away, or lives on the stack).

    GCC 12 (``-g``, DWARF 4 or 5) describes an out-of-line clone by a concrete ``DW_TAG_subprogram`` with
    ``DW_AT_abstract_origin`` naming the original's abstract DIE and ``DW_AT_low_pc`` relocated to the
    clone's section; each kept parameter is a ``DW_TAG_formal_parameter`` whose abstract origin is the
    original parameter, with a location list that starts at the entry in the register the clone's own
    (reduced) argument list passes it in: ``__check_block_validity.constprop.0(inode, line, map)`` has
    ``line`` in ``rsi``. The register is taken from that location, never from an assumed order."""
    per = _regs_cache.setdefault(obj, {})
    key = tuple(sorted(line_args.items()))
    if key not in per:
        per[key] = _clone_line_regs(obj, line_args)
    return per[key]


_regs_cache: weakref.WeakKeyDictionary[Object, dict[tuple[tuple[str, int], ...], dict[str, str]]] = \
    weakref.WeakKeyDictionary()


def _clone_line_regs(obj: Object, line_args: dict[str, int]) -> dict[str, str]:
    wanted = {i: obj.sym_names[i] for i in range(1, obj.nsym)
              if obj.defined[i] and obj.stype[i] == C.STT_FUNC and clone_base(obj.sym_names[i]) in line_args}
    if not wanted:
        return {}
    info = dwarf_info(obj)
    regs = DWARF_REGS.get(int(obj.elf.machine), {})
    if info is None or not regs:
        return {}
    at = {(int(obj.shndx[i]), int(obj.value[i])): name for i, name in wanted.items()}
    out: dict[str, str] = {}
    try:
        for cu in info.iter_CUs():
            for die in cu.get_top_DIE().iter_children():
                if die.tag != "DW_TAG_subprogram" or "DW_AT_abstract_origin" not in die.attributes \
                        or "DW_AT_low_pc" not in die.attributes:
                    continue
                lp = die.attributes["DW_AT_low_pc"]
                name = at.get(addr_target(obj, lp.offset))
                if name is None:
                    continue
                origin = die.get_DIE_from_attribute("DW_AT_abstract_origin")
                oname = origin.attributes.get("DW_AT_name")
                base = clone_base(name)
                if oname is None or oname.value.decode(errors="replace") != base:
                    continue
                params = [c for c in origin.iter_children() if c.tag == "DW_TAG_formal_parameter"]
                n = line_args[base]
                if n > len(params):
                    continue
                line_param = params[n - 1].offset
                for c in die.iter_children():
                    if c.tag == "DW_TAG_formal_parameter" and "DW_AT_abstract_origin" in c.attributes \
                            and c.get_DIE_from_attribute("DW_AT_abstract_origin").offset == line_param:
                        reg = _entry_reg(info, c, int(lp.value), regs)
                        if reg:
                            out[name] = reg
                        break
    except Exception:  # unreadable DWARF: nothing is trusted (every such difference stays a change)
        return {}
    return out
