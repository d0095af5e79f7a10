"""Issue 12 items 1-3: the shared failing cases (../shared/cases) and siblings of each kind, compiled by the
real gcc during the run with the cases' kernel-like flags, under one file name for both sides.

1. a symbol in a section shared by several symbols is carved out alone (klpforge/diff/emit/carve.py);
2. function-scope statics pair through their users, never by GCC's number (klpforge/diff/statics.py);
3. identical-code-folded functions keep their own behaviour for their own callers (klpforge/diff/icf.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, DiffResult, run_diff
from klpforge.diff.model import Object
from klpforge.elf import constants as C
from klpforge.util.errors import UnsafeChange

from .conftest import ROOT, SHARED
from .test_kernel_e2e import baseline, unchanged_tree  # noqa: F401 - fixtures of the kernel test below
from .test_kernel_e2e import build as kbuild
from .test_kernel_e2e import klpforge as run_klpforge

CASES = SHARED / "cases"

#: the flags of ../shared/cases/compile.sh (copied: it writes into the read-only case folder)
CASE_FLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-fno-pic", "-mcmodel=kernel", "-mfentry", "-pg",
              "-mrecord-mcount", "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mno-sse",
              "-fno-strict-aliasing", "-fno-common", "-nostdinc", "-ffreestanding", "-fno-stack-protector"]


@dataclass
class Out:
    """What a diff wrote: its result and the output object's symbols."""

    res: DiffResult
    obj: Object

    def defined(self) -> dict[str, tuple[int, int, str]]:
        """name -> (bind, type, section name) of every named function/object the patch defines."""
        o = self.obj
        return {o.sym_names[i]: (int(o.sbind[i]), int(o.stype[i]), o.sec_names[int(o.shndx[i])])
                for i in range(1, o.nsym) if o.defined[i] and o.stype[i] in (C.STT_FUNC, C.STT_OBJECT)
                and not o.sym_names[i].startswith("klpf_")}

    def klp_targets(self) -> set[str]:
        return {r.symbol for r in self.res.klp_relocs}

    def refs_from(self, secname: str) -> list[str]:
        """Names every relocation of output section ``secname`` (and its klp relocations) points at."""
        o = self.obj
        out = []
        for tgt, rs in o.elf.reloc_sections.items():
            if o.sec_names[tgt] != secname:
                continue
            for s in o.elf.relocs(rs)["sym"].tolist():
                out.append(o.sym_names[s] if o.stype[s] != C.STT_SECTION else o.sec_names[int(o.shndx[s])])
        return out


def build(gcc: str, tmp: Path, orig: str, patched: str, *extra: str) -> tuple[Path, Path]:
    """Compile both sides as ``unit.c`` (the FILE symbol must match), in two directories."""
    objs = []
    for side, src in (("orig", orig), ("patched", patched)):
        d = tmp / side
        d.mkdir(exist_ok=True)
        (d / "unit.c").write_text(src)
        subprocess.run([gcc, *CASE_FLAGS, *extra, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        objs.append(d / "unit.o")
    return objs[0], objs[1]


def diff(a: Path, b: Path, tmp: Path) -> Out:
    res = run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))
    return Out(res, Object.load(tmp / "lp.o"))


def case(name: str) -> tuple[str, str]:
    d = CASES / name
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return (d / "orig.c").read_text(), (d / "patched.c").read_text()


# -- item 2: static locals ------------------------------------------------------------------------------


def test_case_static_local_clone_rename(gcc: str, tmp_path: Path) -> None:
    """expected.txt: alpha.constprop.0's count is the kernel's alpha count (orig count.1); delta's count
    (patched count.1) is a fresh variable."""
    a, b = build(gcc, tmp_path, *case("static-local-clone-rename"))
    o, p = Object.load(a), Object.load(b)
    # the numbers the case is about: alpha's count is count.1 in orig, delta's is count.1 in patched
    assert {o.sym_names[i] for i in range(o.nsym)} >= {"count.1", "count.0", "alpha"}
    assert "alpha.constprop.0" in p.sym_names and "count.2" in p.sym_names
    out = diff(a, b, tmp_path)
    d = out.defined()
    # delta's counter is new (defined in the patch), alpha's clone uses the kernel's alpha counter
    assert "delta" in d and "count.1" in d and d["count.1"][0] == C.STB_LOCAL
    assert "count.2" not in d
    assert "count.1" in out.klp_targets()
    assert out.refs_from(".text.delta").count("count.1") == 3  # delta reads and writes its own new counter
    clone_refs = [r.symbol for r in out.res.klp_relocs if r.section == ".text.alpha.constprop.0"]
    assert clone_refs.count("count.1") == 3  # ... and the clone the kernel's one (orig alpha's count.1)


NEW_SAME_NAME = """
extern void note(int);
static __attribute__((noinline)) int alpha(int step)
{
	static int count;
	count += step%s;
	note(count);
	return count;
}
%s
int run_alpha(int x) { return alpha(x)%s; }
"""
DELTA = """
static __attribute__((noinline)) int delta(int step)
{
	static int count;
	count -= step;
	note(count);
	return count;
}
"""


def test_new_function_static_of_the_only_name_is_fresh(gcc: str, tmp_path: Path) -> None:
    """Orig has one ``count`` (alpha's), patched adds delta with its own and alpha stops using one: the one
    ``count`` of each side must not pair by name."""
    orig = NEW_SAME_NAME % ("", "", "")
    patched = orig.replace("static int count;\n\tcount += step;\n\tnote(count);\n\treturn count;",
                           "note(step);\n\treturn step;").replace("int run_alpha", DELTA + "int run_alpha")
    patched = patched.replace("return alpha(x);", "return alpha(x) + delta(x);")
    a, b = build(gcc, tmp_path, orig, patched)
    assert sum(n.startswith("count.") for n in Object.load(b).sym_names) == 1
    out = diff(a, b, tmp_path)
    assert any(n.startswith("count.") for n in out.defined())  # delta's counter: a new variable
    assert not any(t.startswith("count") for t in out.klp_targets())


TWO_CALLERS = """
extern void note(int);
static %s int bump(int step)
{
	static int count;
	count += step * %d;
	return count;
}
static __attribute__((noinline)) int other(int step)
{
	static int count;
	count ^= step;
	note(count);
	return count;
}
int caller_one(int x) { return bump(x) + 1; }
int caller_two(int x) { return bump(x) + other(x); }
"""


def test_static_of_a_function_inlined_into_two_callers(gcc: str, tmp_path: Path) -> None:
    """bump was out of line; the fix lets GCC inline it into both callers: its counter is still the
    kernel's bump counter, reached from both new callers."""
    a, b = build(gcc, tmp_path, TWO_CALLERS % ("__attribute__((noinline))", 3),
                 TWO_CALLERS % ("inline", 5))
    p = Object.load(b)
    assert "bump" not in p.sym_names  # inlined away, as the test means
    out = diff(a, b, tmp_path)
    assert {f.old_name for f in out.res.patched_functions} == {"caller_one", "caller_two"}
    assert not any(n.startswith("count") for n in out.defined())
    o = Object.load(a)
    bump_count = {o.sym_names[i] for i in users_of_names(o, "bump")}
    klp = [r for r in out.res.klp_relocs if r.symbol.startswith("count.")]
    assert {r.section for r in klp} == {".text.caller_one", ".text.caller_two"}
    assert len(bump_count) == 1 and {r.symbol for r in klp} == bump_count


def test_static_whose_only_user_became_a_part_clone(gcc: str, tmp_path: Path) -> None:
    """The fix lets GCC split scan (-fpartial-inlining): the static's only user is now ``scan.part.0``; it
    is still the kernel's scan counter, not other()'s counter of the same name."""
    src = """
extern int fetch(int);
extern void note(int);
static %s int scan(int n)
{
	static int seen;
	if (__builtin_expect(n < 4, 1))
		return 0;
	for (int i = 0; i < n; i++)
		seen += fetch(i) * fetch(i + %d);
	note(seen);
	note(seen + 1);
	return seen;
}
static __attribute__((noinline)) int other(int n) { static int seen; seen += n; note(seen); return seen; }
int run_scan(int n) { return scan(n) + other(n); }
int run_scan2(int n) { return scan(n + 1) * 3; }
"""
    a, b = build(gcc, tmp_path, src % ("__attribute__((noinline))", 1), src % ("", 2))
    names_b = Object.load(b).sym_names
    assert any(n.startswith("scan.part.") for n in names_b) and "scan" not in names_b
    out = diff(a, b, tmp_path)
    assert not any(n.startswith("seen") for n in out.defined())
    o = Object.load(a)
    scan_seen = {o.sym_names[i] for i in users_of_names(o, "scan")}
    klp = {r.symbol for r in out.res.klp_relocs if r.symbol.startswith("seen.")}
    assert len(scan_seen) == 1 and klp == scan_seen


def users_of_names(o: Object, func: str) -> set[int]:
    """The static locals function ``func`` of ``o`` references."""
    from klpforge.diff.statics import is_static_local, users_of

    statics = {i for i in range(o.nsym) if is_static_local(o, i)}
    return {s for s, fs in users_of(o, statics).items() if any(o.sym_names[f] == func for f in fs)}


def test_ambiguous_static_is_refused_by_name(gcc: str, tmp_path: Path) -> None:
    """alpha is inlined into beta, which has its own ``count``: beta now references two counters, either
    of which may be alpha's; the diff refuses, naming the static."""
    orig = """
extern void note(int);
static __attribute__((noinline)) int alpha(int s) { static int count; count += s; note(count); return count; }
__attribute__((noinline)) int beta(int s) { static int count; count ^= s; return alpha(s) + count; }
"""
    patched = orig.replace("static __attribute__((noinline)) int alpha", "static inline int alpha") \
        .replace("count += s;", "count += 2 * s;")
    a, b = build(gcc, tmp_path, orig, patched)
    assert "alpha" not in Object.load(b).sym_names
    with pytest.raises(UnsafeChange, match=r"static local count\.\d+ \(used by beta\) cannot be correlated"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()


# -- item 3: identical code folding ---------------------------------------------------------------------


def _icf_other_member(orig: str) -> str:
    """The kept-back form of the icf-alias case: the fix edits sum_back instead of sum_front."""
    i = orig.index("sum_back(int n)")
    return orig[:i] + orig[i:].replace("* 7", "* 9", 1)


def _folded(a: Path) -> bool:
    o = Object.load(a)
    f, b = o.sym_names.index("sum_front"), o.sym_names.index("sum_back")
    return bool(o.shndx[f] == o.shndx[b] and o.value[f] == o.value[b])


@pytest.mark.parametrize("edited", ["sum_front", "sum_back"])
def test_case_icf_alias(gcc: str, tmp_path: Path, edited: str) -> None:
    """expected.txt: the member that is not edited keeps its old body for its callers (copied into the patch,
    its callers replaced); no caller is bound to the redirected shared address."""
    orig, patched = case("icf-alias")
    if edited == "sum_back":
        patched = _icf_other_member(orig)
    other = "sum_back" if edited == "sum_front" else "sum_front"
    a, b = build(gcc, tmp_path, orig, patched)
    assert _folded(a) and not _folded(b)
    out = diff(a, b, tmp_path)
    replaced = {f.old_name for f in out.res.patched_functions}
    # one klp_func redirects the shared address to the edited body; the other member's caller is replaced
    # (use_back also changed by itself: its call now names sum_back, which the original folded away)
    assert replaced == {edited, "use_back"} | ({"use_front"} if edited == "sum_back" else set())
    d = out.defined()
    assert d[other][1] == C.STT_FUNC and d[other][0] == C.STB_LOCAL  # the old body, as a new function
    caller = "use_back" if other == "sum_back" else "use_front"
    assert other in out.refs_from(f".text.{caller}")  # calls the copy ...
    assert other not in out.klp_targets() and edited not in out.klp_targets()  # ... never the shared address
    lp = Object.load(tmp_path / "lp.o")
    po = Object.load(b)
    # the copy is the patched object's (= the original's) body of the member, byte for byte
    i, j = lp.sym_names.index(other), po.sym_names.index(other)
    lo, hi = lp.sym_range(i)
    plo, phi = po.sym_range(j)
    assert lp.section_data(int(lp.shndx[i]))[lo:hi] == po.section_data(int(po.shndx[j]))[plo:phi]


def test_icf_global_member_is_refused_naming_both(gcc: str, tmp_path: Path) -> None:
    """A folded member whose address is stored in data cannot be moved to a copy: refused, naming both."""
    orig, _ = case("icf-alias")
    orig += "int (*const back_ops[])(int) = { sum_back };\n"
    patched = orig.replace("* 7", "* 9", 1)
    a, b = build(gcc, tmp_path, orig, patched)
    if not _folded(a):
        pytest.skip("gcc did not fold sum_front and sum_back")
    with pytest.raises(UnsafeChange, match=r"sum_front and sum_back were one body at one address.*identical "
                                           r"code folding.*address of sum_back is stored in"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()


def test_unfolded_functions_are_untouched(gcc: str, tmp_path: Path) -> None:
    """Without folding (-fno-ipa-icf) nothing is copied: only the edited function is replaced."""
    orig, patched = case("icf-alias")
    a, b = build(gcc, tmp_path, orig, patched, "-fno-ipa-icf")
    out = diff(a, b, tmp_path)
    assert {f.old_name for f in out.res.patched_functions} == {"sum_front"}
    assert "sum_back" not in out.defined()


# -- item 1: symbols in shared sections -----------------------------------------------------------------


def test_case_readmostly_new(gcc: str, tmp_path: Path) -> None:
    """expected.txt: only knob_read is replaced and only the new knob_hits allocated; knob_a and knob_b stay
    klp relocations to the running kernel's variables, never copies (least of all a GLOBAL knob_b)."""
    a, b = build(gcc, tmp_path, *case("readmostly-new"))
    out = diff(a, b, tmp_path)
    assert [f.old_name for f in out.res.patched_functions] == ["knob_read"]
    d = out.defined()
    assert set(d) == {"knob_read", "knob_hits"}
    assert d["knob_hits"] == (C.STB_LOCAL, C.STT_OBJECT, ".data..read_mostly")
    assert out.klp_targets() == {"knob_a", "knob_b"}
    assert out.refs_from(".text.knob_read").count("knob_hits") == 1
    lp = out.obj
    assert int(lp.shdrs["size"][lp.find_section(".data..read_mostly")]) == 4  # knob_hits alone
    assert out.res.report["carved_sections"] == {".data..read_mostly": {"kept_bytes": 4, "total_bytes": 12}}


#: text-section attributes of kernel 6.1 (include/linux/sched/debug.h, kprobes.h, spinlock.h, objtool's
#: noinstr, arch/x86 entry code)
TEXT_SECTIONS = [".sched.text", ".kprobes.text", ".spinlock.text", ".entry.text", ".noinstr.text"]

SHARED_TEXT = """
#define __shared __attribute__((__section__("%s")))
extern void sink(int);
static __attribute__((noinline)) int __shared helper(int x) { sink(x); return x * 3; }
int __shared first(int x) { return helper(x) + %d; }
int __shared second(int x) { sink(x + 2); return helper(x) + 2; }
"""


@pytest.mark.parametrize("secname", TEXT_SECTIONS)
def test_changed_function_in_shared_text_section(gcc: str, tmp_path: Path, secname: str) -> None:
    """first changes; helper and second share its section and stay the kernel's: first's call to helper
    (which the assembler resolved inside the section, with no relocation) becomes a klp relocation."""
    a, b = build(gcc, tmp_path, SHARED_TEXT % (secname, 1), SHARED_TEXT % (secname, 5))
    po = Object.load(b)
    sec = po.find_section(secname)
    assert sec is not None and len(po.syms_in_section[sec]) == 3
    assert not len(po.relocs(sec)[po.relocs(sec)["sym"] == po.sym_names.index("helper")])  # resolved call
    out = diff(a, b, tmp_path)
    assert [f.old_name for f in out.res.patched_functions] == ["first"]
    assert set(out.defined()) == {"first"}
    assert out.defined()["first"][2] == secname
    helper = [r for r in out.res.klp_relocs if r.symbol == "helper"]
    assert len(helper) == 1 and helper[0].section == secname and helper[0].type == 4  # R_X86_64_PLT32
    lp = out.obj
    s = lp.find_section(secname)
    f = lp.sym_names.index("first")
    assert int(lp.shdrs["size"][s]) == int(po.size[po.sym_names.index("first")])  # first alone
    # the field the klp relocation fills is zero (6.1's x86 loader refuses a non-zero one)
    field = helper[0].offset
    assert lp.section_data(s)[field:field + 4] == bytes(4) and int(lp.value[f]) == 0
    assert out.res.report["special_sections"]["__mcount_loc"] == {"kept": 1, "total": 3}


def test_shared_text_change_calls_a_new_neighbour(gcc: str, tmp_path: Path) -> None:
    """first now calls a new function of the same section: both are carved out, and the call between them
    (resolved by the assembler) gets a relocation to the new copy; second stays the kernel's."""
    orig = SHARED_TEXT % (".sched.text", 1)
    patched = orig.replace("int __shared first(int x) { return helper(x) + 1; }",
                           "static __attribute__((noinline)) int __shared extra(int x) { sink(x * 7); return x; }\n"
                           "int __shared first(int x) { return helper(x) + extra(x); }")
    a, b = build(gcc, tmp_path, orig, patched)
    out = diff(a, b, tmp_path)
    assert set(out.defined()) == {"first", "extra"}
    assert "extra" in out.refs_from(".sched.text")
    assert {r.symbol for r in out.res.klp_relocs} >= {"helper"}
    assert "second" not in out.klp_targets()


def test_function_in_text_without_function_sections(gcc: str, tmp_path: Path) -> None:
    """-fno-function-sections: every function in .text; one changes, its neighbours stay the kernel's."""
    src = """
extern void sink(int);
static __attribute__((noinline)) int helper(int x) { sink(x); return x * 3; }
int first(int x) { return helper(x) + %d; }
int second(int x) { sink(x + 2); return helper(x) + 2; }
"""
    a, b = build(gcc, tmp_path, src % 1, src % 5, "-fno-function-sections")
    out = diff(a, b, tmp_path)
    assert set(out.defined()) == {"first"}
    assert "helper" in out.klp_targets()


#: data-section attributes of kernel 6.1 (include/linux/cache.h, percpu-defs.h)
DATA_SECTIONS = [".data..read_mostly", ".data..ro_after_init", ".data..percpu", ".data..cacheline_aligned"]

SHARED_DATA = """
#define __shared __attribute__((__section__("%s")))
static int dial_a __shared = 3;
int dial_b __shared = 7;
static int *dial_p __shared = &dial_a;
%s
int dial_read(void)
{
	%s
	return dial_a + dial_b + *dial_p;
}
"""


@pytest.mark.parametrize("secname", DATA_SECTIONS)
def test_new_variable_in_shared_data_section(gcc: str, tmp_path: Path, secname: str) -> None:
    """A new variable beside old ones in a shared data section: only it is allocated; the function's
    accesses to the old ones (one with an immediate after the displacement: ``addl $5, x(%rip)``) stay
    klp relocations to the kernel's variables; the new one's own pointer to an old one too."""
    orig = SHARED_DATA % (secname, "", "")
    patched = SHARED_DATA % (secname, "static int *dial_q __shared = &dial_b;\nstatic int dial_hits __shared;",
                             "dial_hits++; dial_a += 5; *dial_q += 1;")
    a, b = build(gcc, tmp_path, orig, patched)
    out = diff(a, b, tmp_path)
    d = out.defined()
    assert set(d) == {"dial_read", "dial_hits", "dial_q"}
    assert d["dial_hits"][2] == secname and d["dial_q"][2] == secname  # the loader treats some by name
    assert out.klp_targets() == {"dial_a", "dial_b", "dial_p"}
    text = [r for r in out.res.klp_relocs if r.section == ".text.dial_read"]
    assert {r.symbol for r in text} == {"dial_a", "dial_b", "dial_p"}
    data = [r for r in out.res.klp_relocs if r.section == secname]
    assert [(r.symbol, r.offset) for r in data] == [("dial_b", int(out.obj.value[out.obj.sym_names.index("dial_q")]))]
    assert out.refs_from(".text.dial_read").count("dial_hits") >= 1


def test_static_in_bss_without_data_sections(gcc: str, tmp_path: Path) -> None:
    """-fno-data-sections: statics share .bss/.data; a new one is carved out, the old stay references."""
    src = """
static int seen_a;
static int seen_b = 4;
%s
void set_b(int v) { seen_b = v; }
int look(int x) { %s seen_a += x; return seen_a + seen_b; }
"""
    a, b = build(gcc, tmp_path, src % ("", ""), src % ("static int seen_new;", "seen_new += 2;"), "-fno-data-sections")
    out = diff(a, b, tmp_path)
    assert set(out.defined()) == {"look", "seen_new"}
    assert out.klp_targets() == {"seen_a", "seen_b"}
    assert {out.obj.sec_names[int(out.obj.shndx[out.obj.sym_names.index("seen_new")])]} == {".bss"}


def test_grown_function_does_not_change_its_shared_section_neighbours(gcc: str, tmp_path: Path) -> None:
    """helper grows; first and second move, so the displacements of their (assembler-resolved) calls to
    helper change, but their code does not: only helper is replaced."""
    orig = SHARED_TEXT % (".sched.text", 1)
    patched = orig.replace("sink(x); return x * 3;", "sink(x); sink(x + 9); sink(x + 10); sink(x + 11); return x * 3;")
    a, b = build(gcc, tmp_path, orig, patched)
    po, oo = Object.load(b), Object.load(a)
    assert po.value[po.sym_names.index("second")] != oo.value[oo.sym_names.index("second")]
    out = diff(a, b, tmp_path)
    assert [f.old_name for f in out.res.patched_functions] == ["helper"]
    assert set(out.defined()) == {"helper"}


# -- item 3, the impact side ----------------------------------------------------------------------------


def test_impact_keeps_folded_functions_separate(gcc: str, tmp_path: Path) -> None:
    """``klpforge impact`` and ``diff --impact`` on the icf-alias case: sum_front and sum_back share an
    address but are separate functions (``folded``), never pieces of one another; use_back's change is
    explained by the fold breaking."""
    import json

    from klpforge.ipa import predict

    orig, patched = case("icf-alias")
    a, b = build(gcc, tmp_path, orig, patched, "-fdump-ipa-clones")
    assert _folded(a)
    res = predict([a.parent], ["sum_front"], use_cache=False)
    e = res.reasons("sum_front")[0]
    assert e.folded == ["sum_back"] and e.pieces == []
    assert res.functions == {"sum_front"}
    from klpforge.ipa.report import to_text

    assert "shares its address with sum_back (identical code folding)" in to_text(res, color=False)
    rep = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(tmp_path / "lp.o"),
                        "--symtab", str(a), "--json", str(rep), "--impact", str(a.parent)],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr
    imp = json.loads(rep.read_text())["impact"]
    assert "sum_back" not in {x["name"] for x in imp["predicted_unchanged"]}  # not a "piece" of sum_front
    ub = next(u for u in imp["unpredicted"] if u["name"] == "use_back")
    assert "identical code folding" in ub["cause"] and "sum_back" in ub["cause"]


def test_jump_table_beside_named_constants(gcc: str, tmp_path: Path) -> None:
    """Without -ffunction-sections/-fdata-sections a switch's anonymous jump table shares .rodata with named
    constants: the changed function takes its table (whose entries point into it) and nothing else."""
    src = """
extern void sink(int);
static const int weights[8] = { 3, 1, 4, 1, 5, 9, 2, 6 };
int weigh(int i) { return weights[i & 7]; }
int pick(int k)
{
	switch (k) {
	case 0: sink(11); return 1;
	case 1: sink(12); return 4;
	case 2: sink(13); return 9;
	case 3: sink(14); return 16;
	case 4: sink(15); return 25;
	case 5: sink(16); return %d;
	default: return 0;
	}
}
"""
    a, b = build(gcc, tmp_path, src % 36, src % 37, "-fno-function-sections", "-fno-data-sections",
                 "-fjump-tables")
    po = Object.load(b)
    ro = po.find_section(".rodata")
    assert ro is not None and len(po.syms_in_section.get(ro, [])) == 1  # weights, beside the table
    assert any(po.stype[int(s)] == C.STT_SECTION and po.shndx[int(s)] == ro
               for s in po.relocs(po.find_section(".text"))["sym"])  # pick reaches its table anonymously
    out = diff(a, b, tmp_path)
    assert set(out.defined()) <= {"pick", "pick.cold"} and "pick" in out.defined()
    lp = out.obj
    lro = lp.find_section(".rodata")
    assert lro is not None
    # the table (one eight-byte entry per case, each into the new pick) came along; weights did not
    table = [r for r in lp.elf.relocs(lp.elf.reloc_sections[lro])["sym"].tolist()]
    assert len(table) == len(po.relocs(ro)) and {lp.sym_names[s] for s in table} <= {"pick", ".text"}
    assert int(lp.shdrs["size"][lro]) == int(po.shdrs["size"][ro]) - 32


# -- item 1 on the real kernel: built, loaded and checked in QEMU ---------------------------------------


#: (patch, functions replaced, what the patch defines, check, expected output)
KERNEL_CASES = [
    # devkmsg_write() gains a new __read_mostly counter beside devkmsg_log and the other variables of
    # .data..read_mostly; the kernel's own sysctl handler turns devkmsg_log on, and the patched function
    # must see that (the kernel's variable, not a copy)
    ("20-printk-readmostly-new.patch", {"devkmsg_write"}, {"devkmsg_write", "devkmsg_write.cold", "klp_kmsg_writes"},
     "echo on > /proc/sys/kernel/printk_devkmsg && echo a > /dev/kmsg && echo b > /dev/kmsg && "
     "dmesg | grep klpforge-kmsg | tail -n 1", "klpforge-kmsg: 2 writes, devkmsg_log 1"),
    # do_nanosleep() calls a new __sched helper: both leave .sched.text alone (their call, resolved by the
    # assembler, relocated); hrtimer_nanosleep_restart() and the global schedule_hrtimeout*() stay the kernel's
    ("21-hrtimer-sched-text.patch", {"do_nanosleep"}, {"do_nanosleep", "klp_note_sleep", "klp_sleeps"},
     "sleep 0.1; dmesg | grep -m1 klpforge-nanosleep", "klpforge-nanosleep: mode 1"),
]


@pytest.mark.kernel
@pytest.mark.usefixtures("unchanged_tree")
@pytest.mark.parametrize("patch,replaced,included,check,expect", KERNEL_CASES,
                         ids=[c[0].removesuffix(".patch") for c in KERNEL_CASES])
def test_kernel_shared_section(kernel, tmp_path: Path, patch: str, replaced: set[str], included: set[str],
                               check: str, expect: str) -> None:
    """Built with ``klpforge build`` on the prepared 6.1 kernel, loaded and checked in QEMU: only the
    changed and new symbols of a shared section go in, and the patched code uses the kernel's others."""
    import json

    ko = tmp_path / "livepatch-shared.ko"
    r = kbuild(kernel, patch, ko)
    assert r.returncode == 0, r.stderr
    report = json.loads(ko.with_suffix(".json").read_text())
    assert {f["old_name"] for o in report["objects"] for f in o["functions"]} == replaced
    diff_report = report["objects"][0]["diff_report"]
    assert {i["name"] for i in diff_report["included"]} == included
    v = run_klpforge("verify", str(ko), "--kernel", str(kernel.bzimage), "--check", check, "--expect", expect,
                     "--console-log", str(tmp_path / "console.log"), timeout=300)
    assert v.returncode == 0, v.stderr + (tmp_path / "console.log").read_text()[-3000:]


def test_refusals_through_the_cli(gcc: str, tmp_path: Path) -> None:
    """The CLI: a refused folded pair exits 2 with one line per reason on stderr, no traceback, no output."""
    orig, _ = case("icf-alias")
    orig += "int (*const back_ops[])(int) = { sum_back };\n"
    a, b = build(gcc, tmp_path, orig, orig.replace("* 7", "* 9", 1))
    if not _folded(a):
        pytest.skip("gcc did not fold sum_front and sum_back")
    out = tmp_path / "lp.o"
    p = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(out), "--symtab", str(a)],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    assert p.returncode == 2
    assert "sum_front and sum_back were one body at one address" in p.stderr and "back_ops" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()
