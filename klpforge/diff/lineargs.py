"""Which immediates of a function are ``__LINE__`` arguments: a patch that only moves lines changes them.

An immediate counts as a line only when it *reaches the line argument of a line-taking call at that
call*: it is loaded into the register the ABI passes that argument in, in the straight-line code right
before the call (no branch, call or label-crossing jump in between), and nothing else reads or writes the
register in between. Line-taking calls are

* the kernel helpers of :data:`LINE_ARGS` (6.1 prototypes, argument position recorded per helper), and
* any external call whose previous argument is a source file name string (``__FILE__, __LINE__``: the
  pattern of ``ASSERT_RTNL()``'s ``WARN_ONCE(..., "%s (%d)", __FILE__, __LINE__)`` and of printk calls
  that name their place).

Everything else is a change, including a constant given to ``printk``/``ns_capable`` or to any ordinary
function in a function that also calls a line-taking helper. Callees defined in the same object are
named by the caller (compare.py ``_line_relocs``) only when the object is built with ``-pg``, which turns
GCC's ``-fipa-ra`` off: otherwise GCC knows which registers they preserve and may reuse the register
after the call. The line field of ``__bug_table`` entries is data of the table (rebuilt by emit), not code.

Decoding is capstone's, with detail (registers an instruction reads and writes, implicit ones included
where capstone reports them; s390 register pairs and ranges are widened here). LoongArch has no capstone
decoder: there every difference is a change.

>>> x86 = arch_for(62)  # mov edi, file; mov esi, 120; call __might_sleep
>>> line_loads(x86, decode(x86, bytes.fromhex("bf00000000be78000000e800000000")),
...            [(1, "", b"kernel/sched/core.c"), (11, "__might_sleep", None)])
{1}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .arch import Arch
from .disasm import decoder

__all__ = ["LINE_ARGS", "ARG_REGS", "Insn", "decode", "line_loads", "only_lines_differ", "is_source_file_name"]

#: Kernel helpers that take ``__LINE__``, with the 1-based position of the line parameter (kernel 6.1:
#: include/asm-generic/bug.h, include/linux/kernel.h, include/linux/sched.h, include/linux/lockdep.h,
#: kernel/panic.c, include/kunit/test-bug.h, fs/btrfs/ctree.h, fs/ext4/ext4.h, fs/ext4/ext4_jbd2.h; the
#: ``warn_slowpath_null``/``___might_sleep`` forms are older kernels').
LINE_ARGS: dict[str, int] = {
    "warn_slowpath_fmt": 2, "warn_slowpath_null": 2, "__warn": 2,
    "__might_sleep": 2, "___might_sleep": 2, "__might_resched": 2, "__might_fault": 2,
    "__cant_sleep": 2, "__cant_migrate": 2, "lockdep_rcu_suspicious": 2, "__kunit_fail_current_test": 2,
    "__btrfs_handle_fs_error": 3, "__btrfs_abort_transaction": 3, "__btrfs_panic": 3,
    "__ext4_error": 3, "__ext4_error_inode": 3, "__ext4_error_file": 3, "__ext4_std_error": 3,
    "__ext4_warning": 3, "__ext4_warning_inode": 3, "__ext4_grp_locked_error": 2, "__ext4_iget": 5,
    "__ext4_mark_inode_dirty": 4, "__ext4_journal_get_write_access": 2, "__ext4_forget": 2,
    "__ext4_journal_get_create_access": 2, "__ext4_handle_dirty_metadata": 2, "__ext4_journal_start_sb": 2,
    "__ext4_journal_stop": 2, "__ext4_journal_start_reserved": 2, "__ext4_check_dir_entry": 2,
    "__dump_mmp_msg": 4,
    # 6.1 fs/ext4/{block_validity,xattr,extents,inode}.c: (function, line) helpers called across files or
    # from the same file (named only in objects built with -pg: compare.py)
    "ext4_check_blockref": 2, "__xattr_check_inode": 5, "__ext4_ext_check": 2, "__ext4_ext_dirty": 2,
    "__read_extent_tree_block": 2, "__check_block_validity": 3,
}

#: A ``__FILE__`` string as Kbuild spells it (relative source path).
_SOURCE_FILE = re.compile(rb"^[\w.+/-]+\.[chS]$")

#: Per architecture (``Arch.name``): argument registers in ABI order, in canonical spelling.
ARG_REGS: dict[str, tuple[str, ...]] = {
    "x86_64": ("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
    "ppc64le": ("r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10"),
    "s390x": ("r2", "r3", "r4", "r5", "r6"),
    "aarch64": ("x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7"),
}
#: Calls (and unconditional tail calls) whose relocation names the callee.
_CALLS: dict[str, tuple[str, ...]] = {
    "x86_64": ("call", "jmp"), "ppc64le": ("bl", "b"), "s390x": ("brasl", "jg"), "aarch64": ("bl", "b"),
}
#: Control transfers capstone does not put in a jump/call/ret group.
_BARRIERS: dict[str, tuple[str, ...]] = {
    "x86_64": ("ud2", "int3", "syscall", "hlt"), "ppc64le": ("sc", "trap", "tw", "td", "twi", "tdi"),
    "s390x": ("brasl", "bras", "basr", "balr", "bal", "bas", "svc", "br", "bcr", "brcl", "j"),
    "aarch64": ("svc", "brk"),
}
_X86_ALIAS = {a: r for r, al in {
    "rdi": ("rdi", "edi", "di", "dil"), "rsi": ("rsi", "esi", "si", "sil"), "rdx": ("rdx", "edx", "dx", "dl", "dh"),
    "rcx": ("rcx", "ecx", "cx", "cl", "ch"), "r8": ("r8", "r8d", "r8w", "r8b"), "r9": ("r9", "r9d", "r9w", "r9b"),
}.items() for a in al}
_S390_PAIRS = frozenset((
    "d", "dr", "dl", "dlr", "dlg", "dlgr", "dsg", "dsgr", "dsgf", "dsgfr", "m", "mr", "mfy", "ml", "mlr", "mlg",
    "mlgr", "mg", "mgrk", "mvcl", "mvcle", "mvclu", "clcl", "clcle", "clclu", "cds", "cdsy", "cdsg", "lpq",
    "stpq", "cu12", "cu14", "cu21", "cu24", "cu41", "cu42", "cuse", "tre", "troo", "trot", "trto", "trtt",
))
_PPC_MULTI = frozenset(("lmw", "stmw", "lswi", "stswi", "lswx", "stswx"))
_REG_TEXT = {"ppc64le": re.compile(r"\br(\d{1,2})\b"), "s390x": re.compile(r"%r(\d{1,2})\b")}
_REG, _IMM = 1, 2  # capstone operand types (the same value on x86, ppc, sysz and arm64)


@dataclass(frozen=True)
class Insn:
    """One decoded instruction, reduced to what the line rule needs. ``touched``: canonical argument
    registers it reads or writes; ``imm_to``: the register it loads an immediate into ('' otherwise);
    ``barrier``: control transfer or undecodable bytes."""

    off: int
    size: int
    raw: bytes
    touched: frozenset[str]
    imm_to: str
    barrier: bool
    mnemonic: str


def _canon(arch: str, name: str) -> str:
    if arch == "x86_64":
        return _X86_ALIAS.get(name, "")
    if arch == "aarch64":
        return "x" + name[1:] if name[:1] in ("w", "x") and name[1:].isdigit() else ""
    if arch == "s390x":
        return "r" + name if name.isdigit() else name
    return name


def decode(arch: Arch, code: bytes, base: int = 0) -> list[Insn]:
    """Decode ``code`` (bytes of one function from offset ``base``, which must be an instruction boundary)
    with capstone's detail; offsets are ``base``-relative. Empty when capstone has no decoder for ``arch``."""
    if not arch.cs_arch or arch.name not in ARG_REGS:
        return []
    md = decoder(arch, detail=True)
    args = frozenset(ARG_REGS[arch.name])
    out = []
    for ins in md.disasm(code, base):
        raw = bytes(ins.bytes)
        mn = ins.mnemonic
        if mn == ".byte":
            out.append(Insn(ins.address, ins.size, raw, args, "", True, mn))
            continue
        touched = _touched(arch.name, ins, args)
        ops = ins.operands
        imm_to = ""
        if mn in arch.line_mnemonics and len(ops) == 2 and ops[0].type == _REG and ops[1].type == _IMM:
            imm_to = _canon(arch.name, ins.reg_name(ops[0].reg))
        groups = {ins.group_name(g) for g in ins.groups}
        barrier = bool(groups & {"jump", "call", "ret", "return", "int", "iret", "branch_relative"}) \
            or mn in _BARRIERS.get(arch.name, ()) or mn in _CALLS[arch.name]
        out.append(Insn(ins.address, ins.size, raw, touched, imm_to, barrier, mn))
    return out


def _touched(arch: str, ins: Any, args: frozenset[str]) -> frozenset[str]:
    """Argument registers ``ins`` reads or writes, implicit ones included (conservative: a register
    capstone cannot tell about counts as touched)."""
    names: set[str] = set()
    if arch in ("x86_64", "aarch64"):
        r, w = ins.regs_access()
        names = {_canon(arch, ins.reg_name(x)) for x in (*r, *w)}
    else:
        nums = [int(n) for n in _REG_TEXT[arch].findall(ins.op_str)]
        names = {f"r{n}" for n in nums}
        names |= {_canon(arch, ins.reg_name(x)) for x in (*ins.regs_read, *ins.regs_write)}
        mn = ins.mnemonic
        if arch == "s390x" and mn.startswith(("lm", "stm")) and len(nums) >= 2:
            a, b = nums[0], nums[1]
            names |= {f"r{(a + k) % 16}" for k in range((b - a) % 16 + 1)}  # ranges wrap around r15
        elif arch == "s390x" and mn in _S390_PAIRS:
            names |= {f"r{n + 1}" for n in nums if n % 2 == 0}  # even/odd register pairs
        elif arch == "ppc64le" and mn in _PPC_MULTI:
            return args
    return frozenset(names) & args


def is_source_file_name(s: bytes | None) -> bool:
    """Is ``s`` a ``__FILE__`` string (``net/core/dev.c``)?"""
    return s is not None and _SOURCE_FILE.match(s) is not None


def _source(insns: list[Insn], j: int, reg: str) -> int:
    """Index of the instruction that last sets ``reg`` before call ``j`` in straight-line code, if that
    instruction is the only use of the register in between; -1 when the value comes from elsewhere."""
    for k in range(j - 1, -1, -1):
        ins = insns[k]
        if ins.barrier:
            return -1
        if reg in ins.touched:
            return k
    return -1


def line_loads(arch: Arch, insns: list[Insn], relocs: list[tuple[int, str, bytes | None]],
               line_regs: Mapping[str, str] | None = None) -> set[int]:
    """Indices of the instructions in ``insns`` whose immediate is a ``__LINE__`` argument.

    ``relocs``: ``(offset in the function, callee name if the target is an undefined symbol else '',
    string the target addresses if any)`` for each relocation of the function. ``line_regs``: callee ->
    the register of its line argument, for callees whose position is not that of :data:`LINE_ARGS`
    (GCC clones of those helpers, read from DWARF: klpforge/diff/dwarfread.py ``clone_line_regs``)."""
    regs = ARG_REGS.get(arch.name)
    if not regs or not insns:
        return set()
    starts = [x.off for x in insns]
    import bisect

    at: dict[int, list[tuple[str, bytes | None]]] = {}
    for off, callee, s in relocs:
        k = bisect.bisect_right(starts, off) - 1
        if k >= 0 and off < insns[k].off + insns[k].size:
            at.setdefault(k, []).append((callee, s))
    calls = _CALLS[arch.name]
    out: set[int] = set()
    for j, ins in enumerate(insns):
        if ins.mnemonic not in calls:
            continue
        callees = [c for c, _ in at.get(j, []) if c]
        if len(callees) != 1:
            continue
        callee = callees[0]
        wanted: list[str] = []
        n = LINE_ARGS.get(callee)
        if n is not None and n <= len(regs):
            wanted.append(regs[n - 1])
        elif line_regs and line_regs.get(callee) in regs:
            wanted.append(line_regs[callee])
        for pos in range(1, len(regs)):
            k = _source(insns, j, regs[pos - 1])
            if k >= 0 and any(is_source_file_name(s) for _, s in at.get(k, [])):
                wanted.append(regs[pos])  # (__FILE__, __LINE__)
        for reg in wanted:
            k = _source(insns, j, reg)
            if k >= 0 and insns[k].imm_to == reg:
                out.add(k)
    return out


#: How many instructions before a differing one the detailed decoding starts (where the call's other
#: arguments are loaded); a source further back is not seen, and the difference then counts as a change.
WINDOW = 16


def only_lines_differ(arch: Arch, a: bytes, a_rel: list[tuple[int, str, bytes | None]], b: bytes,
                      b_rel: list[tuple[int, str, bytes | None]], a_regs: Mapping[str, str] | None = None,
                      b_regs: Mapping[str, str] | None = None) -> bool:
    """True when ``a`` and ``b`` (the original and patched bytes of one function, whose relocations
    already agree) differ only in ``__LINE__`` immediates (see the module docstring). ``a_regs``/``b_regs``:
    the line registers of clone callees in each object (:func:`line_loads`).

    The whole function is decoded cheaply (sizes and mnemonics); only the few instructions from
    :data:`WINDOW` before each difference to the call it feeds are decoded with detail."""
    if not arch.cs_arch or arch.name not in ARG_REGS:
        return False
    md = decoder(arch)
    la = list(md.disasm_lite(a, 0))
    lb = list(md.disasm_lite(b, 0))
    if len(la) != len(lb):
        return False
    diff = []
    for k, (x, y) in enumerate(zip(la, lb, strict=True)):
        if x[0] != y[0] or x[1] != y[1]:
            return False  # different instruction boundaries
        if a[x[0]:x[0] + x[1]] != b[y[0]:y[0] + y[1]]:
            if x[2] != y[2] or x[2] not in arch.line_mnemonics:
                return False
            diff.append(k)
    if not diff:
        return False
    calls = _CALLS[arch.name]
    for k in diff:
        j = next((i for i in range(k + 1, len(la)) if la[i][2] in calls), -1)
        if j < 0:
            return False
        w0 = max(0, k - WINDOW)
        lo, hi = la[w0][0], la[j][0] + la[j][1]
        xa, xb = decode(arch, a[lo:hi], lo), decode(arch, b[lo:hi], lo)
        i = k - w0
        if len(xa) != j - w0 + 1 or len(xb) != len(xa) or not xa[i].imm_to or xa[i].imm_to != xb[i].imm_to:
            return False
        if i not in line_loads(arch, xa, a_rel, a_regs) or i not in line_loads(arch, xb, b_rel, b_regs):
            return False
    return True
