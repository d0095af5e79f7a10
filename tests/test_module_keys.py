"""Tracepoints, static calls and static keys of a module in replaced code (issue 16 item 1).

6.1 registers a module's ``__jump_table`` and ``.static_call_sites`` before it applies the klp relocations
of module symbols, so entries keyed in a module cannot stay in the live patch: a static call then calls its
trampoline, a tracepoint's jump label is written as an enabled key leaves it (the ``funcs`` test behind it
decides), and any other module static key is refused, naming the function and the key. The objects are
compiled by gcc during the run, with the entries laid out as 6.1's ``asm/jump_label.h`` and objtool do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.model import Object
from klpforge.elf import ElfFile
from klpforge.util.errors import UnsafeChange

#: a module's tracepoint "ev" as include/linux/tracepoint.h builds it (6.1, x86_64, static calls inline)
TRACE = r"""
struct static_key { int enabled; long type; };
struct tracepoint { const char *name; struct static_key key; void *funcs; };
struct static_call_key { void *func; unsigned long type; };
int __traceiter_ev(void *data, int v);
struct tracepoint __tracepoint_ev = { "ev" };
struct static_key plainkey;
struct static_call_key __SCK__tp_func_ev = { __traceiter_ev };
int __traceiter_ev(void *data, int v) { return v + !!data; }
asm(".pushsection .static_call.text, \"ax\"\n.globl __SCT__tp_func_ev\n.type __SCT__tp_func_ev, @function\n"
    "__SCT__tp_func_ev:\n\tjmp __traceiter_ev\n.size __SCT__tp_func_ev, . - __SCT__tp_func_ev\n.popsection");

static inline __attribute__((always_inline)) int key_on(struct static_key *k)
{
    asm goto("1: .byte @NOP@\n\t"
        ".pushsection __jump_table, \"aw\"\n\t.balign 8\n\t"
        ".long 1b - ., %l[l_yes] - .\n\t.quad %c0 + %c1 - .\n\t.popsection"
        : : "i"(k), "i"(@BRANCH@) : : l_yes);
    return @BRANCH@;
l_yes:
    return !@BRANCH@;
}
static inline __attribute__((always_inline)) void trace_ev(int v)
{
    if (key_on(&__tracepoint_ev.key)) {
        void *data = *(void * volatile *)&__tracepoint_ev.funcs;
        if (data)
            asm volatile("1: call __SCT__tp_func_ev\n\t"
                         ".pushsection .static_call_sites, \"aw\"\n\t"
                         ".long 1b - .\n\t.long __SCK__tp_func_ev - .\n\t.popsection"
                         : "+D"(data), "+S"(v) : : "rax", "rcx", "rdx", "r8", "r9", "r10", "r11", "memory");
    }
}
int drop_inode(int x) { int d = x > 3 @CHANGE@; trace_ev(d); return d; }
int other(int x) { trace_ev(x); return x; }
int plain_user(int x) { return key_on(&plainkey) ? x @PLAIN@ : 0; }
"""

NOP5, NOP2 = "0x0f,0x1f,0x44,0x00,0x00", "0x66,0x90"
ENV = {"JUMP_STRUCT_SIZE": "16", "STATIC_CALL_STRUCT_SIZE": "8"}


def _src(nop: str, branch: int, change: str = "", plain: str = "") -> str:
    return TRACE.replace("@NOP@", nop).replace("@BRANCH@", str(branch)).replace("@CHANGE@", change) \
        .replace("@PLAIN@", plain)


def _entry(obj: Object, table: str, func: str) -> tuple[int, int]:
    """(site, target) offsets in ``func``'s section of the table entry of ``func`` (first two fields)."""
    sec = obj.find_section(table)
    assert sec is not None
    r = obj.relocs(sec)
    fsec = int(obj.shndx[obj.sym_names.index(func)])
    mine = [x for x in r if int(obj.shndx[int(x["sym"])]) == fsec]
    return int(mine[0]["addend"]), int(mine[1]["addend"]) if table == "__jump_table" else -1


@pytest.mark.parametrize(("nop", "branch", "expect"), [(NOP5, 0, "jmp32"), (NOP2, 0, "jmp8"), (NOP5, 1, "nop")],
                         ids=["nop5", "nop2", "likely"])
def test_module_tracepoint_keeps_working_without_table_entries(cc, tmp_path: Path, nop: str, branch: int,
                                                               expect: str) -> None:
    a = cc(_src(nop, branch), "a")
    b = cc(_src(nop, branch, "|| x < 0"), "b")
    out = tmp_path / "lp.o"
    res = run_diff(a, b, out, DiffOptions(target="mymod", symtab=a, env=ENV))
    assert [f.old_name for f in res.patched_functions] == ["drop_inode"]
    # no table entry keyed in the module is left; the report says what was taken out
    assert res.report["module_keyed_entries"] == {"__jump_table": 1, ".static_call_sites": 1}
    assert not [r for r in res.klp_relocs if r.section in ("__jump_table", ".static_call_sites")]
    lp = Object.load(out)
    assert lp.find_section("__jump_table") is None and lp.find_section(".static_call_sites") is None
    # the static call goes through the module's trampoline (a klp relocation, resolved before first use)
    assert ("__SCT__tp_func_ev", "mymod") in {(r.symbol, r.obj) for r in res.klp_relocs}
    assert "__SCK__tp_func_ev" not in {r.symbol for r in res.klp_relocs}
    # the jump-label site now does what the enabled key does; the bytes around it are unchanged
    p = Object.load(b)
    site, target = _entry(p, "__jump_table", "drop_inode")
    text = p.section_data(int(p.shndx[p.sym_names.index("drop_inode")]))
    new = lp.section_data(int(lp.shndx[lp.sym_names.index("drop_inode")]))
    assert len(new) == len(text)
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(new[site:], site, 1))
    width = 2 if nop == NOP2 else 5
    assert insn.size == width and new[:site] == text[:site] and new[site + width:] == text[site + width:]
    if expect == "nop":
        assert insn.mnemonic == "nop"
    else:
        assert insn.mnemonic == "jmp" and int(insn.op_str, 16) == target
        assert new[site] == (0xeb if expect == "jmp8" else 0xe9)
    # the output is a valid object for GNU tools too
    ElfFile.open(out)


def test_vmlinux_tracepoint_keeps_its_entries(cc, tmp_path: Path) -> None:
    """Keys in vmlinux are resolved before the loader reads the tables (6.1 applies vmlinux klp
    relocations in apply_relocations()): the entries stay, the site stays a NOP."""
    a, b = cc(_src(NOP5, 0), "a"), cc(_src(NOP5, 0, "|| x < 0"), "b")
    res = run_diff(a, b, tmp_path / "lp.o", DiffOptions(target="vmlinux", symtab=a, env=ENV))
    assert "module_keyed_entries" not in res.report
    assert res.report["special_sections"]["__jump_table"] == {"kept": 1, "total": 3}
    assert res.report["special_sections"][".static_call_sites"] == {"kept": 1, "total": 2}
    assert {(r.section, r.symbol) for r in res.klp_relocs} >= {("__jump_table", "__tracepoint_ev"),
                                                               (".static_call_sites", "__SCK__tp_func_ev")}


def test_module_static_key_refused_naming_function_and_key(cc, tmp_path: Path) -> None:
    a = cc(_src(NOP5, 0), "a")
    b = cc(_src(NOP5, 0, plain="+ 1"), "b")
    with pytest.raises(UnsafeChange) as e:
        run_diff(a, b, tmp_path / "lp.o", DiffOptions(target="mymod", symtab=a, env=ENV))
    msg = str(e.value)
    assert "function plain_user tests jump label plainkey, a static key of module mymod" in msg
    assert "static_key_enabled()" in msg and "\n" not in msg.strip()
    assert "drop_inode" not in msg and "other" not in msg  # never a function that is not in the live patch
    assert not (tmp_path / "lp.o").exists()
