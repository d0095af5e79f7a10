"""Per-function facts read from one object's code: what each function references, whether it is folded
into another, whether it can return, and which caller-saved registers stay live across its calls.

Functions are ``STT_FUNC`` symbols of an object built with ``-ffunction-sections``. References come from
the relocations inside the function (a section symbol plus addend is resolved to the function it lands
in), so ``calls`` counts both calls and address-taking: enough to see a call merged or removed.

>>> facts = function_facts(Object.load("t.o"))          # doctest: +SKIP
>>> facts["pc_caller"].refs                              # doctest: +SKIP
Counter({'csq': 1})
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..diff.arch import Arch, arch_for
from ..diff.disasm import decoder
from ..diff.model import Object
from ..elf import constants as C

__all__ = ["Func", "function_facts", "live_across_calls", "can_return", "CALLER_SAVED_X86"]

#: x86-64 SysV caller-saved registers a caller could keep a value in across a call when IPA-RA knows the
#: callee does not clobber them (``%rax`` is left out: it carries the return value).
_X86_PLT32 = 4  # R_X86_64_PLT32: what GCC emits for a call to an external function

CALLER_SAVED_X86 = ("rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


@dataclass
class Func:
    """One function of an object. ``own_size``: bytes of code it alone holds (0 for an identical-code-folded
    alias of another function); ``alias_of``: the function whose code it shares; ``thunk_to``: the function
    its whole body jumps to (ICF of an address-taken or global function); ``refs``: referenced function
    names (as written in this object, clone suffixes included) with counts."""

    name: str
    index: int
    size: int
    own_size: int
    section: int
    binding: int
    compiled: bool = True  # GCC compiled it into a section of its own (not asm, e.g. a static-call trampoline)
    alias_of: str | None = None
    thunk_to: str | None = None
    refs: Counter[str] = field(default_factory=Counter)
    stack_pads: int = 0  # x86-64 ``sub $8,%rsp``: a stack realigned by 8 for the calls it makes


def _target_name(obj: Object, arch: Arch, sym: int, addend: int, rtype: int) -> str | None:
    """Function a relocation refers to (None for data, labels, strings)."""
    t = int(obj.stype[sym])
    if t == C.STT_SECTION:
        sec = int(obj.shndx[sym])
        if not (0 < sec < obj.nsec) or not obj.is_text(sec):
            return None
        s = obj.symbol_at(sec, addend + arch.pcrel_bias.get(rtype, 0))
        if s < 0 or obj.stype[s] != C.STT_FUNC:
            return None
        return obj.sym_names[s]
    if t == C.STT_FUNC:
        return obj.sym_names[sym]
    if not obj.defined[sym] and t == C.STT_NOTYPE and obj.sym_names[sym] and \
            (arch.name != "x86_64" or rtype == _X86_PLT32):
        return obj.sym_names[sym]  # an external called (PLT32); an external address may be data
    return None


def _int(s: str) -> int:
    """Capstone's direct branch target (``0x1c``, ``8``), or -1 for anything else."""
    try:
        return int(s, 0)
    except ValueError:
        return -1


def function_facts(obj: Object) -> dict[str, Func]:
    """:class:`Func` for every defined function of ``obj``, by symbol name."""
    arch = arch_for(obj.elf.machine)
    funcs = np.flatnonzero((obj.stype == C.STT_FUNC) & obj.defined)
    out: dict[str, Func] = {}
    fentry = set(arch.fentry_names)
    for i in funcs.tolist():
        sec = int(obj.shndx[i])
        if not (0 < sec < obj.nsec):
            continue
        lo, hi = obj.sym_range(i)
        owner = int(obj.section_owner[sec])
        alias = None
        if owner >= 0 and owner != i and int(obj.value[owner]) == lo and obj.stype[owner] == C.STT_FUNC:
            alias = obj.sym_names[owner]  # same address as the section's own function: folded into it
        f = Func(obj.sym_names[i], i, hi - lo, 0 if alias else hi - lo, sec, int(obj.sbind[i]),
                 obj.sec_names[sec].startswith(".text.") and (owner == i or alias is not None), alias)
        r = obj.relocs(sec)
        if len(r):
            a, b = np.searchsorted(r["offset"], [lo, hi])
            for s, add, typ in zip(r["sym"][a:b].tolist(), r["addend"][a:b].tolist(), r["type"][a:b].tolist(),
                                   strict=True):
                n = _target_name(obj, arch, int(s), int(add), int(typ))
                if n is not None and n not in fentry and n != f.name:
                    f.refs[n] += 1
        f.thunk_to = _thunk_target(obj, arch, f, lo, hi, fentry)
        f.stack_pads = _stack_pads(obj, arch, f, lo, hi)
        out[f.name] = f
    return out


def _stack_pads(obj: Object, arch: Arch, f: Func, lo: int, hi: int) -> int:
    """How often ``f`` moves %rsp by 8 to align it for a call (x86-64; 0 elsewhere). With
    ``-fipa-stack-alignment`` (gcc 12 ipa-stack-alignment, off under ``-flive-patching``) the build knows
    which callees of the unit need no 16-byte aligned stack and leaves the padding out."""
    if arch.name != "x86_64" or not f.refs:
        return 0
    code = obj.section_data(f.section)[lo:hi]
    return sum(1 for _a, _s, mn, ops in decoder(arch).disasm_lite(code, 0)
               if mn == "sub" and ops.replace(" ", "") == "rsp,8")


def _thunk_target(obj: Object, arch: Arch, f: Func, lo: int, hi: int, fentry: set[str]) -> str | None:
    """The function ``f`` merely jumps to (``[call __fentry__;] jmp X``), else None (x86-64 only)."""
    if arch.name != "x86_64" or f.size > 16 or len(f.refs) != 1 or sum(f.refs.values()) != 1:
        return None
    code = obj.section_data(f.section)[lo:hi]
    ins = [(mn, ops) for _a, _s, mn, ops in decoder(arch).disasm_lite(code, 0)]
    ins = [x for x in ins if not x[0].startswith("nop") and x[0] not in ("endbr64", "int3")]
    if ins and ins[0][0] == "call":
        ins = ins[1:]  # the ftrace entry
    if len(ins) == 1 and ins[0][0] == "jmp":
        return next(iter(f.refs))
    return None


def can_return(obj: Object, f: Func) -> bool:
    """False when ``f``'s code has no return instruction and no jump out of it (a tail call): it never
    returns. True when it may, or when the architecture is not decoded (x86-64 only)."""
    arch = arch_for(obj.elf.machine)
    if arch.name != "x86_64":
        return True
    lo = int(obj.value[f.index])
    code = obj.section_data(f.section)[lo:lo + f.size]
    md = decoder(arch)
    for _a, _s, mn, ops in md.disasm_lite(code, 0):
        if mn.startswith("ret") or (mn == "jmp" and not 0 <= _int(ops) < f.size):
            return True  # ret, or an indirect jump or one out of the function: can leave it
    r = obj.relocs(f.section)
    # a jmp whose displacement is relocated to another function is a tail call: look at those bytes
    for off in r["offset"][(r["offset"] > lo) & (r["offset"] < lo + f.size)].tolist():
        if code[off - lo - 1] == 0xE9:
            return True
    return False


def live_across_calls(obj: Object, f: Func, callees: set[str]) -> dict[str, list[str]]:
    """For each call from ``f`` to a function in ``callees``: caller-saved registers the code reads after
    the call before writing them, following the fall-through path up to the next call, return or jump
    (x86-64; an under-approximation: branches are not followed). ``{callee: [registers]}``, callees with
    none left out. This is what IPA-RA allows: without it, such a value must sit in a callee-saved
    register or on the stack."""
    arch = arch_for(obj.elf.machine)
    if arch.name != "x86_64" or not callees:
        return {}
    import capstone
    from capstone import x86 as cx

    lo = int(obj.value[f.index])
    code = obj.section_data(f.section)[lo:lo + f.size]
    md = decoder(arch, detail=True)
    insns = list(md.disasm(code, 0))
    r = obj.relocs(f.section)
    rel_at = {}
    for off, s, add, typ in zip(r["offset"].tolist(), r["sym"].tolist(), r["addend"].tolist(), r["type"].tolist(),
                                strict=True):
        if lo <= off < lo + f.size:
            rel_at[off - lo] = _target_name(obj, arch, int(s), int(add), int(typ))
    out: dict[str, list[str]] = {}
    for k, ins in enumerate(insns):
        if ins.mnemonic != "call":
            continue
        tgt = next((rel_at[o] for o in range(ins.address, ins.address + ins.size) if o in rel_at), None)
        if tgt not in callees:
            continue
        written: set[str] = set()
        found: list[str] = []
        for nxt in insns[k + 1:]:
            if nxt.group(capstone.CS_GRP_CALL) or nxt.group(capstone.CS_GRP_RET) or nxt.mnemonic == "jmp":
                break
            try:
                rd, wr = nxt.regs_access()
            except capstone.CsError:
                break
            reads = {_full_reg(nxt.reg_name(x)) for x in rd}
            # ``xor %ecx,%ecx`` reads its operand but does not use the value
            if nxt.mnemonic in ("xor", "sub") and len(nxt.operands) == 2 and \
                    all(op.type == cx.X86_OP_REG for op in nxt.operands) and \
                    nxt.operands[0].reg == nxt.operands[1].reg:
                reads = set()
            for reg in reads:
                if reg in CALLER_SAVED_X86 and reg not in written and reg not in found:
                    found.append(reg)
            written |= {_full_reg(nxt.reg_name(x)) for x in wr}
        if found:
            out.setdefault(str(tgt), [])
            out[str(tgt)] += [x for x in found if x not in out[str(tgt)]]
    return out


_REG64 = {"ecx": "rcx", "cx": "rcx", "cl": "rcx", "ch": "rcx", "edx": "rdx", "dx": "rdx", "dl": "rdx",
          "dh": "rdx", "esi": "rsi", "si": "rsi", "sil": "rsi", "edi": "rdi", "di": "rdi", "dil": "rdi"}


def _full_reg(name: str | None) -> str:
    """``ecx`` -> ``rcx``, ``r8d`` -> ``r8``: the 64-bit register a name is part of."""
    if not name:
        return ""
    if name in _REG64:
        return _REG64[name]
    if name.startswith("r") and name[1:].rstrip("dwb").isdigit():
        return name.rstrip("dwb") if name[-1] in "dwb" else name
    return name


def call_segments(obj: Object, f: Func) -> list[tuple[str, tuple[str, ...]]] | None:
    """``f``'s code cut at its calls: for each call, the callee and the mnemonics from just after it up to
    the next call or the end (x86-64; None elsewhere). Two builds of one function whose call sequences
    match can be compared call site by call site: what follows a call is where a caller uses what IPA
    knew of the callee (modref: memory it leaves alone is not reloaded, a local it does not let escape is
    not stored)."""
    arch = arch_for(obj.elf.machine)
    if arch.name != "x86_64":
        return None
    lo = int(obj.value[f.index])
    code = obj.section_data(f.section)[lo:lo + f.size]
    r = obj.relocs(f.section)
    rel_at: dict[int, str | None] = {}
    for off, s, add, typ in zip(r["offset"].tolist(), r["sym"].tolist(), r["addend"].tolist(), r["type"].tolist(),
                                strict=True):
        if lo <= off < lo + f.size:
            rel_at[off - lo] = _target_name(obj, arch, int(s), int(add), int(typ))
    fentry = set(arch.fentry_names)
    out: list[tuple[str, list[str]]] = []
    for addr, size, mn, _ops in decoder(arch).disasm_lite(code, 0):
        if mn == "call":
            tgt = next((rel_at[o] for o in range(addr, addr + size) if o in rel_at), None) or "?"
            if tgt in fentry:
                continue
            out.append((tgt, []))
        elif out:
            out[-1][1].append(mn)
    return [(t, tuple(m)) for t, m in out]
