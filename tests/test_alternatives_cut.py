"""Auxiliary code is cut per piece (issue 16 item 7): a change to one function of an object carries only
the ``.altinstr_replacement`` and ``.altinstr_aux`` pieces of that function, not every piece of the object
with relocations into unrelated functions. Compiled by gcc during the run, laid out as 6.1's
``ALTERNATIVE()`` (arch/x86/include/asm/alternative.h) and ``_static_cpu_has()`` (asm/cpufeature.h) do.
"""

from __future__ import annotations

from pathlib import Path

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.model import Object

SRC = r"""
extern void slow_a(void); extern void fast_a(void); extern void slow_b(void); extern void fast_b(void);
struct cpuinfo { unsigned char caps[32]; } boot_cpu_data;
#define ALT(oldcall, newcall, feat) asm volatile("661: call " oldcall "\n662:\n" \
    ".pushsection .altinstructions,\"a\"\n .long 661b - .\n .long 6631f - .\n .word " #feat "\n" \
    " .byte 662b-661b\n .byte 6641f-6631f\n.popsection\n" \
    ".pushsection .altinstr_replacement,\"ax\"\n6631:\n call " newcall "\n6641:\n.popsection" \
    : : : "memory", "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
static inline __attribute__((always_inline)) int has_feat(int bit)
{
    asm goto("jmp 6f\n.pushsection .altinstr_aux,\"ax\"\n6:\n testb %[bitnum], %[cap]\n jnz %l[t_yes]\n"
             " jmp %l[t_no]\n.popsection"
             : : [bitnum] "i"(1 << (bit & 7)), [cap] "m"(boot_cpu_data.caps[bit >> 3]) : : t_yes, t_no);
    return 0;
t_yes:
    return 1;
t_no:
    return 0;
}
int fa(int x) { ALT("slow_a", "fast_a", 1); return has_feat(3) ? x + @K@ : x; }
int fb(int x) { ALT("slow_b", "fast_b", 2); return has_feat(5) ? x * 2 : x - 1; }
int fc(int x) { ALT("slow_b", "fast_b", 3); return has_feat(7) ? x * 3 : x - 2; }
"""


def test_alternatives_and_aux_code_cut_to_the_included_function(cc, tmp_path: Path) -> None:
    a, b = cc(SRC.replace("@K@", "1"), "a"), cc(SRC.replace("@K@", "2"), "b")
    out = tmp_path / "lp.o"
    res = run_diff(a, b, out, DiffOptions(symtab=a, env={}))
    assert [f.old_name for f in res.patched_functions] == ["fa"]
    p, lp = Object.load(b), Object.load(out)
    for name in (".altinstr_replacement", ".altinstr_aux"):
        whole = int(p.shdrs["size"][p.find_section(name)])
        kept = int(lp.shdrs["size"][lp.find_section(name)])
        assert res.report["carved_sections"][name] == {"kept_bytes": kept, "total_bytes": whole}
        assert 0 < kept and 3 * kept <= whole  # one piece of three
    assert res.report["special_sections"][".altinstructions"] == {"kept": 1, "total": 3}
    # nothing of fb/fc travels: no reference to their callees or their code
    named = {r.symbol for r in res.klp_relocs} | set(res.report["normal_externals"])
    assert "fast_a" in named and not named & {"fast_b", "slow_b", "fb", "fc"}
    # the kept replacement is fa's call of fast_a, and the aux piece jumps back into fa only
    # (by fa's symbol or, as the assembler wrote the jump, fa's section; boot_cpu_data is a klp relocation)
    aux = {lp.sym_names[lp.section_owner[int(lp.shndx[int(x["sym"])])]]
           for x in lp.relocs(lp.find_section(".altinstr_aux"))}
    assert aux == {"fa"}


def test_every_piece_used_keeps_the_section_whole(cc, tmp_path: Path) -> None:
    src = SRC.replace("@K@", "1")
    a = cc(src, "a")
    b = cc(src.replace("x * 2 : x - 1", "x * 4 : x - 1").replace("x * 3 : x - 2", "x * 5 : x - 2")
           .replace("x + 1 :", "x + 7 :"), "b")
    res = run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))
    assert [f.old_name for f in res.patched_functions] == ["fa", "fb", "fc"]
    assert ".altinstr_replacement" not in res.report["carved_sections"]
    assert res.report["special_sections"][".altinstructions"] == {"kept": 3, "total": 3}
