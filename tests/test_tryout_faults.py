"""Wrong live patches a fresh-user tryout found (exit 0 with a patch that changes unchanged code), compiled by the
real gcc during the run with the kernel-like flags of ../shared/cases/compile.sh, here mostly *without*
``-ffunction-sections -fdata-sections`` (one ``.text``, where the assembler resolves calls without relocations).

1. identical-code-folded functions in one ``.text``: the other member's callers reach the shared address with
   no relocation; they must still be found and moved to a copy of its old body (klpforge/diff/icf.py);
2. same-named function-scope statics are never paired by position (klpforge/diff/statics.py);
3. a branch relaxed to another encoding length, reaching the same target, is no change (klpforge/diff/sharedsec.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from klpforge.diff import DiffOptions, DiffResult, run_diff
from klpforge.diff.model import Object
from klpforge.elf import constants as C
from klpforge.util.errors import UnsafeChange

from .conftest import SHARED

#: ../shared/cases/compile.sh's flags without -ffunction-sections -fdata-sections
PLAIN_FLAGS = ["-O2", "-fno-pic", "-mcmodel=kernel", "-mfentry", "-pg", "-mrecord-mcount",
               "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mno-sse", "-fno-strict-aliasing", "-fno-common",
               "-nostdinc", "-ffreestanding", "-fno-stack-protector"]
SECTION_FLAGS = ["-ffunction-sections", "-fdata-sections"]


def build(cc: str, tmp: Path, orig: str, patched: str, flags: list[str]) -> tuple[Path, Path]:
    """Compile both sides as ``unit.c`` (the FILE symbol must match), in two directories."""
    objs = []
    for side, src in (("orig", orig), ("patched", patched)):
        d = tmp / side
        d.mkdir(exist_ok=True)
        (d / "unit.c").write_text(src)
        subprocess.run([cc, *flags, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        objs.append(d / "unit.o")
    return objs[0], objs[1]


def diff(a: Path, b: Path, tmp: Path) -> DiffResult:
    return run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))


def case(name: str) -> tuple[str, str]:
    d = SHARED / "cases" / name
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return (d / "orig.c").read_text(), (d / "patched.c").read_text()


def folded(a: Path, *names: str) -> bool:
    o = Object.load(a)
    at = {(int(o.shndx[o.sym_names.index(n)]), int(o.value[o.sym_names.index(n)])) for n in names}
    return len(at) == 1


def calls_in(lp: Path, func: str) -> set[str]:
    """What output function ``func`` calls: the names its relocations point at, and the functions its
    relocation-free (assembler-resolved) calls and jumps reach, decoded with capstone."""
    import capstone

    o = Object.load(lp)
    f = next(i for i in range(1, o.nsym) if o.defined[i] and o.stype[i] == C.STT_FUNC and o.sym_names[i] == func)
    lo, hi = o.sym_range(f)
    sec = int(o.shndx[f])
    out = set()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for x in md.disasm(o.section_data(sec)[lo:hi], lo):
        if x.mnemonic in ("call", "jmp") and x.op_str[:1].isdigit():
            t = int(x.op_str, 0)
            if not lo <= t < hi:
                out |= {o.sym_names[m] for m in o.syms_in_section.get(sec, []) if int(o.value[m]) == t}
    for tgt, rs in o.elf.reloc_sections.items():
        if tgt != int(o.shndx[f]):
            continue
        r = o.elf.relocs(rs)
        for s, off in zip(r["sym"].tolist(), r["offset"].tolist(), strict=True):
            if lo <= off < hi:
                out.add(o.sym_names[s])
    return out


def local_funcs(lp: Path) -> set[str]:
    o = Object.load(lp)
    return {o.sym_names[i] for i in range(1, o.nsym)
            if o.defined[i] and o.stype[i] == C.STT_FUNC and o.sbind[i] == C.STB_LOCAL}


# -- 1. identical code folding in one .text -------------------------------------------------------------

FOLD3 = """extern int table[64];
#define F(name) __attribute__((noinline)) static int name(int n) \\
	{ int s = 0; for (int i = 0; i < n; i++) s += table[i] * 7; return s; }
F(f1)
%s
F(f3)
int u1(int n) { return f1(n) + 1; }
int u2(int n) { return f2(n) + 2; }
int u3(int n) { return f3(n) + 3; }
"""


@pytest.mark.parametrize("edited", ["sum_front", "sum_back"])
def test_icf_in_plain_text_moves_the_other_members_callers(gcc: str, tmp_path: Path, edited: str) -> None:
    """The icf-alias case without -ffunction-sections: use_back reaches the shared address with an assembler-
    resolved call; the member that is not edited is copied and its caller replaced to call the copy."""
    orig, patched = case("icf-alias")
    if edited == "sum_back":
        i = orig.index("sum_back(int n)")
        patched = orig[:i] + orig[i:].replace("* 7", "* 9", 1)
    other = "sum_back" if edited == "sum_front" else "sum_front"
    caller = "use_back" if other == "sum_back" else "use_front"
    a, b = build(gcc, tmp_path, orig, patched, PLAIN_FLAGS)
    if not folded(a, "sum_front", "sum_back"):
        pytest.skip("gcc did not fold sum_front and sum_back")
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {edited, caller}
    assert other in local_funcs(tmp_path / "lp.o")  # the old body, as a new function of the patch
    assert other in calls_in(tmp_path / "lp.o", f"klpf_vmlinux__{caller}__0")  # the caller calls the copy
    assert other not in {r.symbol for r in res.klp_relocs} and edited not in {r.symbol for r in res.klp_relocs}


def test_icf_three_members_middle_edited(gcc: str, tmp_path: Path) -> None:
    """f1, f2, f3 one body; the fix edits f2: f1's and f3's callers (u1, u3) are moved to one copy (f1 and f3
    are still folded in the patched object) and f2's redirect serves u2."""
    orig = FOLD3 % "F(f2)"
    patched = FOLD3 % ("__attribute__((noinline)) static int f2(int n) "
                       "{ int s = 0; for (int i = 0; i < n; i++) s += table[i] * 3; return s; }")
    a, b = build(gcc, tmp_path, orig, patched, PLAIN_FLAGS)
    if not folded(a, "f1", "f2", "f3"):
        pytest.skip("gcc did not fold f1, f2 and f3")
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"f2", "u1", "u3"}
    lp = tmp_path / "lp.o"
    assert calls_in(lp, "klpf_vmlinux__u1__0") & {"f1", "f3"}
    assert calls_in(lp, "klpf_vmlinux__u3__0") & {"f1", "f3"}
    assert not {"f1", "f2", "f3"} & {r.symbol for r in res.klp_relocs}


def test_icf_in_plain_text_same_result_as_with_function_sections(gcc: str, tmp_path: Path) -> None:
    """The edited member and the moved caller are the same with and without -ffunction-sections."""
    orig, patched = case("icf-alias")
    got: list[set[str]] = []
    for flags, sub in ((PLAIN_FLAGS, "plain"), (PLAIN_FLAGS + SECTION_FLAGS, "sections")):
        (tmp_path / sub).mkdir()
        a, b = build(gcc, tmp_path / sub, orig, patched, flags)
        got.append({f.old_name for f in diff(a, b, tmp_path / sub).patched_functions})
    assert got == [{"sum_front", "use_back"}] * 2


def test_icf_in_plain_text_refused_on_aarch64(tmp_path: Path) -> None:
    """aarch64: klpforge cannot find every assembler-resolved call inside one .text, so it refuses, naming the
    folded functions."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed")
    orig, patched = case("icf-alias")
    flags = ["-O2", "-fno-pic", "-fno-asynchronous-unwind-tables", "-fno-strict-aliasing", "-fno-common", "-nostdinc",
             "-ffreestanding", "-fno-stack-protector", "-fpatchable-function-entry=2"]
    a, b = build(cc, tmp_path, orig, patched, flags)
    if not folded(a, "sum_front", "sum_back"):
        pytest.skip("gcc did not fold sum_front and sum_back")
    with pytest.raises(UnsafeChange, match=r"sum_front and sum_back were one body at one address.*identical code "
                                           r"folding.*sum_back shares its section \.text with other code.*on aarch64"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()



def test_icf_short_tail_jump_to_the_other_member_is_refused(gcc: str, tmp_path: Path) -> None:
    """use_back tail-jumps to sum_back with a 2-byte jmp the assembler resolved: it is found as sum_back's
    caller, and since that jump cannot be relocated once use_back is copied out of .text, the diff refuses
    naming it (instead of leaving use_back on the redirected address)."""
    orig, patched = (s.replace("return sum_back(n) + 2;", "return sum_back(n);") for s in case("icf-alias"))
    a, b = build(gcc, tmp_path, orig, patched, PLAIN_FLAGS)
    if not folded(a, "sum_front", "sum_back"):
        pytest.skip("gcc did not fold sum_front and sum_back")
    if _jump_sizes(b, "use_back") != {2}:
        pytest.skip("use_back does not tail-jump to sum_back with a short jmp")
    with pytest.raises(UnsafeChange, match=r"use_back\+0x[0-9a-f]+ reaches sum_back in the shared section \.text "
                                           r"through a displacement the assembler resolved"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()

# -- 2. same-named statics of the same functions --------------------------------------------------------

BOTH = pytest.mark.parametrize("flags", [PLAIN_FLAGS, PLAIN_FLAGS + SECTION_FLAGS], ids=["plain", "sections"])

SL5_ORIG = """extern void note(int);
static inline __attribute__((always_inline)) int f(void) { static int count; return ++count; }
static inline __attribute__((always_inline)) int g(void) { static int count; return count += 2; }
int h(int x) { if (x) return f(); return g(); }
"""
SL5_PATCHED = """extern void note(int);
static inline __attribute__((always_inline)) int g(void) { static int count; return count += 2; }
static inline __attribute__((always_inline)) int f(void) { static int count; return ++count; }
int h(int x) { if (!x) return g() + 1; return f(); }
"""
SL6_ORIG = "int h(int x) { if (x) { static int c; return ++c; } else { static int c; return c += 2; } }\n"
SL6_PATCHED = "int h(int x) { if (!x) { static int c; return (c += 2) + 1; } else { static int c; return ++c; } }\n"


def _refused(a: Path, b: Path, tmp: Path, static: str, users: str) -> None:
    with pytest.raises(UnsafeChange, match=rf"static local {static}\.\d+ \(used by {users}\) cannot be correlated: "
                                           r"2 statics of that name are used by the same functions and hold the "
                                           r"same size and initial value.*pairing by GCC's number or position"):
        diff(a, b, tmp)
    assert not (tmp / "lp.o").exists()


@BOTH
def test_inlined_functions_statics_of_one_name_are_refused(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """f's and g's ``count`` are both h's (always_inline) and both zero ints: the changed h uses them, and
    nothing tells which running counter is which (the old report paired count.0<->count.0 by position)."""
    a, b = build(gcc, tmp_path, SL5_ORIG, SL5_PATCHED, flags)
    _refused(a, b, tmp_path, "count", "h")


@BOTH
def test_block_statics_swapped_are_refused(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """Two ``static int c`` in blocks of h, the blocks swapped by the patch."""
    a, b = build(gcc, tmp_path, SL6_ORIG, SL6_PATCHED, flags)
    _refused(a, b, tmp_path, "c", "h")


@BOTH
def test_statics_only_unchanged_code_uses_are_no_refusal(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """The same indistinguishable statics, but the patch edits another function: h stays in the running
    kernel, nothing uses the statics from the patch, and the diff goes through."""
    extra = "int other(int y) { return y + %d; }\n"
    a, b = build(gcc, tmp_path, SL5_ORIG + extra % 1, SL5_ORIG + extra % 2, flags)
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"other"}
    assert not any(r.symbol.startswith("count") for r in res.klp_relocs)


@BOTH
def test_block_statics_told_apart_by_contents(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """Two ``s`` arrays in blocks of h, swapped by the patch, hold different strings: each pairs with the
    running kernel's array of the same strings, whatever GCC numbered them."""
    orig = ("extern void note(const char *const *);\nint h(int x) { if (x) { static const char *const s[] = "
            "{ \"a\", \"b\" }; note(s); return 1; } else { static const char *const s[] = { \"c\", \"d\" }; "
            "note(s); return 2; } }\n")
    patched = ("extern void note(const char *const *);\nint h(int x) { if (!x) { static const char *const s[] = "
               "{ \"c\", \"d\" }; note(s); return 3; } else { static const char *const s[] = { \"a\", \"b\" }; "
               "note(s); return 1; } }\n")
    a, b = build(gcc, tmp_path, orig, patched, flags)
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"h"}
    o, p = Object.load(a), Object.load(b)

    def first_string(obj: Object, name: str) -> str:
        """The string the array's first pointer points at (its relocation into .rodata.str)."""
        i = obj.sym_names.index(name)
        sec, lo = int(obj.shndx[i]), int(obj.value[i])
        r = obj.relocs(sec)
        k = int(np.flatnonzero(r["offset"] == lo)[0])
        t = int(obj.shndx[int(r["sym"][k])])
        data = obj.section_data(t)
        start = int(r["addend"][k]) + int(obj.value[int(r["sym"][k])])
        return data[start:data.index(b"\0", start)].decode()

    pairs = {c["patched"]: c["orig"] for c in res.report["correlation"] if c["patched"].startswith("s.")}
    assert len(pairs) == 2
    for pn, on in pairs.items():
        assert first_string(p, pn) == first_string(o, on)
    assert {first_string(p, pn) for pn in pairs} == {"a", "c"}


@BOTH
def test_statics_referenced_from_data_are_refused(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """Sibling in data: each block's ``c`` is reached through its own ``pc`` table, both tables alike; the
    changed h uses the tables, which are refused by name."""
    src = ("extern void note(int *const *);\nvoid h(int x) { if (%s) { static int c; static int *const pc[] = { &c }; "
           "c += %d; note(pc); } else { static int c; static int *const pc[] = { &c }; c += %d; note(pc); } }\n")
    a, b = build(gcc, tmp_path, src % ("x", 1, 2), src % ("!x", 3, 1), flags)
    with pytest.raises(UnsafeChange, match=r"static local pc\.\d+ \(used by h\) cannot be correlated"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()


@BOTH
def test_static_left_alone_pairs_by_elimination(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """Three ``c`` in blocks of h; the patch re-initialises one (which data judging refuses as such) and the
    other two are told apart by their initial values: no static is called ambiguous."""
    src = ("int h(int x) { if (x == 1) { static int c = 1; return ++c; } if (x == 2) { static int c = 2; "
           "return ++c; } { static int c = %d; return c += %d; } }\n")
    a, b = build(gcc, tmp_path, src % (3, 1), src % (4, 2), flags)
    with pytest.raises(UnsafeChange) as e:
        diff(a, b, tmp_path)
    assert "cannot be correlated" not in str(e.value)
    assert re.search(r"data c\.\d+ \(\.data[^)]*\) changed \(bytes\)", str(e.value))


# -- 3. branch relaxation in one .text ------------------------------------------------------------------

RELAX = """extern int table[64];
extern void note(int);
__attribute__((noinline)) static int beta(int x) { note(x); return table[x & 63]; }
__attribute__((noinline)) static int gamma_(int x) { note(x + 1); return table[x & 31]; }
%s
int run_gamma(int x) { return gamma_(x); }
int run_beta(int x) { return %s(x); }
"""
#: a new function between the callees and run_beta: its tail jump no longer fits in rel8
BULK = ("int bulk(int x) { int s = 0; for (int i = 0; i < 64; i++) s += table[i] * (x + i) ^ (s >> 3); "
        + " ".join(f"note(s + {k});" for k in range(17)) + " return s; }")


def _jump_sizes(obj_path: Path, func: str) -> set[int]:
    """Sizes of the jmp instructions of ``func`` (capstone)."""
    import capstone

    o = Object.load(obj_path)
    i = o.sym_names.index(func)
    lo, hi = o.sym_range(i)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return {x.size for x in md.disasm(o.section_data(int(o.shndx[i]))[lo:hi], lo) if x.mnemonic == "jmp"}


def test_relaxed_jump_to_the_same_target_is_no_change(gcc: str, tmp_path: Path) -> None:
    """run_beta's tail jump to beta is rel8 in the original and rel32 once bulk sits between them: the same
    instruction, reaching the same function, so only the new bulk is in the patch."""
    a, b = build(gcc, tmp_path, RELAX % ("", "beta"), RELAX % (BULK, "beta"), PLAIN_FLAGS)
    if (_jump_sizes(a, "run_beta"), _jump_sizes(b, "run_beta")) != ({2}, {5}):
        pytest.skip("gcc/as did not relax run_beta's tail jump differently")
    res = diff(a, b, tmp_path)
    assert res.patched_functions == [] and "bulk" in res.included_functions
    assert "run_beta" not in res.included_functions and "run_gamma" not in res.included_functions


def test_relaxed_jump_to_another_target_is_a_change(gcc: str, tmp_path: Path) -> None:
    """The same relaxation, but run_beta now jumps to gamma_: it is changed."""
    a, b = build(gcc, tmp_path, RELAX % ("", "beta"), RELAX % (BULK, "gamma_"), PLAIN_FLAGS)
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"run_beta"}



SWAP = """extern void note(int);
static int xa(int x); static int xb(int x);
int run(int x) { return %s(x) + 1; }
__attribute__((noinline)) static int %s(int x) { note(x + 1); return 2; }
__attribute__((noinline)) static int %s(int x) { note(x); return 1; }
"""


def test_same_bytes_resolved_call_to_another_function_is_a_change(gcc: str, tmp_path: Path) -> None:
    """run calls xa in the original and xb after the fix; GCC put the callee first both times, so run's bytes
    (a resolved ``call .text+0``) are identical. The call reaches another function: run is changed and its
    replacement calls the kernel's xb (it used to be "no change found")."""
    a, b = build(gcc, tmp_path, SWAP % ("xa", "xb", "xa"), SWAP % ("xb", "xb", "xa"), PLAIN_FLAGS)
    o, p = Object.load(a), Object.load(b)
    ro, rp = o.sym_names.index("run"), p.sym_names.index("run")
    lo, hi = o.sym_range(ro)
    plo, phi = p.sym_range(rp)
    if o.section_data(int(o.shndx[ro]))[lo:hi] != p.section_data(int(p.shndx[rp]))[plo:phi]:
        pytest.skip("run's bytes differ: gcc placed the callees elsewhere")
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"run"}
    # gcc dropped the unused xb from the original: it comes as a new function, and nothing names xa
    assert "xb" in res.included_functions and "xa" not in {r.symbol for r in res.klp_relocs}
    assert calls_in(tmp_path / "lp.o", "klpf_vmlinux__run__0") >= {"xb"}
    assert any("now reaches xb, was xa" in c["why"] for c in res.report["changed"] if c["name"] == "run")

def test_case_static_local_clone_rename_plain(gcc: str, tmp_path: Path) -> None:
    """The static-local-clone-rename case without -ffunction-sections: run_beta's jump to beta took another
    length only because the code before it grew; only run_alpha is replaced."""
    a, b = build(gcc, tmp_path, *case("static-local-clone-rename"), PLAIN_FLAGS)
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"run_alpha"}


@BOTH
def test_ignored_statics_of_one_name_get_fresh_copies(gcc: str, tmp_path: Path, flags: list[str]) -> None:
    """KPATCH_IGNORE_STATIC("count"): the patch gets fresh counters, so which kernel counter each was does
    not matter and nothing is refused."""
    ign = 'static char *__ign_count __attribute__((used, section(".kpatch.ignore.data"))) = "count";\n'
    a, b = build(gcc, tmp_path, SL5_ORIG + ign, SL5_PATCHED + ign, flags)
    res = diff(a, b, tmp_path)
    assert {f.old_name for f in res.patched_functions} == {"h"}
    fresh = [i["name"] for i in res.report["included"] if "KPATCH_IGNORE_STATIC" in i["why"]]
    assert sorted(n.split(".")[0] for n in fresh) == ["count", "count"]
    assert not any(r.symbol.startswith("count") for r in res.klp_relocs)
