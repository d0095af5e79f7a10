"""Correlation, comparison and selection rules on objects compiled by the real gcc during the test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.correlate import correlate
from klpforge.diff.model import Object
from klpforge.util.errors import NoChange, UnsafeChange


def diff(a: Path, b: Path, tmp: Path):
    return run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))


def reason(a: Path, b: Path, name: str) -> tuple[str, str]:
    o, p = Object.load(a), Object.load(b)
    c = correlate(o, p)
    i = o.sym_names.index(name)
    j = int(c.o2p[i])
    return (p.sym_names[j] if j >= 0 else ""), c.reasons.get(i, "")


INLINE = """
static int helper(int x) { return x * %d + 1; }
int caller_a(int x) { return helper(x) + 1; }
int caller_b(int x) { return helper(x) - 1; }
int untouched(int x) { return x ^ 7; }
"""


def test_inlined_static_helper_means_replacing_its_callers(cc, tmp_path: Path) -> None:
    a, b = cc(INLINE % 3, "a"), cc(INLINE % 5, "b")
    res = diff(a, b, tmp_path)
    assert sorted(f.old_name for f in res.patched_functions) == ["caller_a", "caller_b"]
    assert "untouched" not in res.included_functions
    assert (tmp_path / "lp.o").exists()


def test_no_change_exits_3_and_writes_nothing(cc, tmp_path: Path) -> None:
    a, b = cc(INLINE % 3, "a"), cc(INLINE % 3, "b")
    with pytest.raises(NoChange, match="no change found"):
        diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()


CONSTPROP = """
__attribute__((noinline)) static int scale(int v, int k) { return v * k + %d; }
int user1(int v) { return scale(v, 3); }
int user2(int v) { return scale(v, 3) + 1; }
"""


def test_constprop_clone_correlates_despite_renumbering(cc, tmp_path: Path) -> None:
    a, b = cc(CONSTPROP % 1, "a"), cc(CONSTPROP % 2, "b")
    syms = Object.load(a).sym_names
    clone = next(n for n in syms if n.startswith("scale."))
    assert ".constprop." in clone or ".isra." in clone
    twin, why = reason(a, b, clone)
    assert twin.startswith("scale.") and why in ("same local name", "same name up to GCC clone number")
    res = diff(a, b, tmp_path)
    assert clone in [f.old_name for f in res.patched_functions]
    assert "user1" not in res.included_functions  # callers of an out-of-line clone stay untouched


COLD = """
extern void report(const char *, int) __attribute__((cold));
extern int printk(const char *, ...);
int process(int *p, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < 0) { report("x", i); printk("bad %%d %%d\\n", i, s); return -1; }
        s += p[i] * %s;
    }
    return s;
}
"""


def test_cold_part_travels_with_its_parent(cc, tmp_path: Path) -> None:
    a, b = cc(COLD % "3", "a"), cc(COLD % "5", "b")  # the hot path changes, the cold part does not
    assert "process.cold" in Object.load(a).sym_names  # a report() call is cold: GCC splits it out
    res = diff(a, b, tmp_path)
    assert res.included_functions == ["process", "process.cold"]
    assert [f.old_name for f in res.patched_functions] == ["process"]  # .cold is reached via process
    assert any("cold part of process" in i["why"] for i in res.report["included"])


def test_changed_cold_part_changes_its_parent(cc, tmp_path: Path) -> None:
    a = cc(COLD.replace('report("x"', 'report("old"') % "3", "a")
    b = cc(COLD.replace('report("x"', 'report("new"') % "3", "b")
    res = diff(a, b, tmp_path)
    assert res.included_functions == ["process", "process.cold"]
    assert [f.old_name for f in res.patched_functions] == ["process"]


STATIC_LOCAL = """
int counter_a(void) { static int count; return ++count; }
int counter_b(void) { static int count; return count += %d; }
"""


def test_static_locals_match_by_referencing_function(cc, tmp_path: Path) -> None:
    a, b = cc(STATIC_LOCAL % 2, "a"), cc(STATIC_LOCAL % 3, "b")
    o = Object.load(a)
    locals_ = [n for n in o.sym_names if n.startswith("count.")]
    assert len(locals_) == 2
    res = diff(a, b, tmp_path)
    assert res.included_functions == ["counter_b"]
    # both static locals stay references to the running kernel's variables: never copied
    assert all(i["type"] == "function" for i in res.report["included"])
    klp = {r.symbol for r in res.klp_relocs}
    assert any(s.startswith("count.") for s in klp)


SWITCH = """
const char *name(int s) {
    switch (s) { case 0: return "a"; case 1: return "b"; case 2: return "c"; case 3: return "d";
                 case 4: return "e"; case 5: return "f"; %s default: return "?"; }
}
int other(int s) { return s + 1; }
"""


def test_changed_switch_table_changes_its_function(cc, tmp_path: Path) -> None:
    a, b = cc(SWITCH % "", "a"), cc(SWITCH % 'case 6: return "g";', "b")
    res = diff(a, b, tmp_path)
    assert res.included_functions == ["name"]
    ch = {c["name"]: c["why"] for c in res.report["changed"]}
    assert "name" in ch and "other" not in ch


STRINGS = """
extern int printk(const char *, ...);
void hello(void) { printk("%s\\n"); }
void bye(void) { printk("bye\\n"); }
"""


def test_string_literals_compared_by_content(cc, tmp_path: Path) -> None:
    a, b = cc(STRINGS % "hello", "a"), cc(STRINGS % "hello, patched", "b")
    res = diff(a, b, tmp_path)
    assert res.included_functions == ["hello"]
    why = {c["name"]: c["why"] for c in res.report["changed"]}["hello"]
    assert "hello, patched" in why


DATA = """
int limit = %d;
int get_limit(void) { return limit; }
"""


def test_changed_data_is_refused_with_its_name(cc, tmp_path: Path) -> None:
    a, b = cc(DATA % 10, "a"), cc(DATA % 20, "b")
    with pytest.raises(UnsafeChange) as ei:
        diff(a, b, tmp_path)
    assert "data limit" in str(ei.value) and "shadow variable" in str(ei.value)
    assert not (tmp_path / "lp.o").exists()


INIT = """
extern int printk(const char *, ...);
__attribute__((section(".init.text"))) int setup(void) { return printk("%s"); }
"""


def test_changed_init_code_is_refused(cc, tmp_path: Path) -> None:
    a, b = cc(INIT % "v1", "a"), cc(INIT % "v2", "b")
    with pytest.raises(UnsafeChange, match=r"setup is in \.init\.text"):
        diff(a, b, tmp_path)


NOTRACE = """
__attribute__((no_instrument_function)) int raw(int x) { return x + %d; }
"""


def test_function_without_fentry_is_refused(cc, tmp_path: Path) -> None:
    a, b = cc(NOTRACE % 1, "a"), cc(NOTRACE % 2, "b")
    with pytest.raises(UnsafeChange, match="raw has no ftrace entry"):
        diff(a, b, tmp_path)


# 6.1's line-taking forms: generic WARN (warn_slowpath_fmt's 2nd parameter) and ASSERT_RTNL's
# WARN_ONCE(..., "%s (%d)", __FILE__, __LINE__) (__warn_printk itself takes no line: klpforge/diff/lineargs.py)
WARN = """
extern void __warn_printk(const char *fmt, ...);
extern void warn_slowpath_fmt(const char *file, const int line, unsigned taint, const char *fmt, ...);
%s
void check(int x) { if (x) warn_slowpath_fmt(__FILE__, __LINE__, 9, "bad"); }
void assert_rtnl(int x) { if (x) __warn_printk("RTNL: assertion failed at %%s (%%d)\\n", __FILE__, __LINE__); }
"""


def test_line_number_only_change_is_not_a_change(cc, tmp_path: Path) -> None:
    a, b = cc(WARN % "", "a"), cc(WARN % "\n\n\n", "b")
    with pytest.raises(NoChange, match=r"only __LINE__ values moved in assert_rtnl, check\)"):
        diff(a, b, tmp_path)


NEWFN = """
extern int printk(const char *, ...);
static __attribute__((noinline)) int added(int x) { return printk("added %%d", x); }
int entry(int x) { return %s; }
"""


def test_new_function_is_included_and_not_patched(cc, tmp_path: Path) -> None:
    a = cc("extern int printk(const char *, ...);\nint entry(int x) { return x; }\n", "a")
    b = cc(NEWFN % "added(x)", "b")
    res = diff(a, b, tmp_path)
    assert res.new == ["added"] and res.included_functions == ["added", "entry"]
    assert [f.old_name for f in res.patched_functions] == ["entry"]


PART = """
extern int printk(const char *, ...);
extern int work(int);
int slow_path(int x)
{
	if (__builtin_expect(x < 10, 1))
		return x;
	for (int i = 0; i < x; i++)
		printk("step %%d %%d\\\\n", i, work(i) * %s);
	return work(x) + work(x + 1);
}
int user1(int x) { return slow_path(x) + 1; }
"""


def test_partial_inlining_patches_the_split_part_only(cc, tmp_path: Path) -> None:
    a, b = cc(PART % "7", "a"), cc(PART % "9", "b")
    assert "slow_path.part.0" in Object.load(a).sym_names
    twin, why = reason(a, b, "slow_path.part.0")
    assert twin == "slow_path.part.0" and why == "same local name"
    res = diff(a, b, tmp_path)
    # the inlined header of slow_path (in user1 and slow_path) is unchanged: only the split part changes
    assert [f.old_name for f in res.patched_functions] == ["slow_path.part.0"]


UNIQUE = """
#define __PASTE(a, b) a##b
#define PASTE(a, b) __PASTE(a, b)
#define UNIQUE_ID(p) PASTE(PASTE(__UNIQUE_ID_, p), __COUNTER__)
%s
static const char UNIQUE_ID(note)[] __attribute__((used, section(".rodata.notes"))) = "v1";
extern int get(void);
int bump(void) { return get() + 1; }
"""


def test_unique_id_correlates_across_counter_shift(cc, tmp_path: Path) -> None:
    # an extra __COUNTER__ use before it renumbers __UNIQUE_ID_note0 to __UNIQUE_ID_note1
    a, b = cc(UNIQUE % "", "a"), cc(UNIQUE % "static int UNIQUE_ID(pad) __attribute__((unused));", "b")
    assert "__UNIQUE_ID_note0" in Object.load(a).sym_names and "__UNIQUE_ID_note1" in Object.load(b).sym_names
    twin, why = reason(a, b, "__UNIQUE_ID_note0")
    assert twin == "__UNIQUE_ID_note1" and why == "same name up to GCC clone number"
    with pytest.raises(NoChange):
        diff(a, b, tmp_path)


WARN_ONCE = """
extern int printk(const char *, ...);
int check(int x)
{
	static int __warned;
	if (x < 0 && !__warned) { __warned = 1; printk("%s %%d\\\\n", x); }
	return x;
}
"""


def test_special_static_gets_a_fresh_copy(cc, tmp_path: Path) -> None:
    a, b = cc(WARN_ONCE % "negative", "a"), cc(WARN_ONCE % "negative value", "b")
    twin, why = reason(a, b, next(n for n in Object.load(a).sym_names if n.startswith("__warned")))
    assert twin == "" and why == ""  # never correlated
    res = diff(a, b, tmp_path)
    inc = {i["name"]: i["why"] for i in res.report["included"]}
    warned = next(n for n in inc if n.startswith("__warned"))
    assert inc[warned].startswith("fresh copy of special static")


MACROS = """
extern int printk(const char *, ...);
int same(int x) { return x * 3; }
int counter(void) { static int count; return count += %s; }
static void *__kpatch_force_func_same __attribute__((used, section(".kpatch.force"))) = same;
%s
"""


def test_kpatch_force_unsafe_replaces_an_unchanged_function(cc, tmp_path: Path) -> None:
    a, b = cc(MACROS % ("1", ""), "a"), cc(MACROS % ("2", ""), "b")
    res = diff(a, b, tmp_path)
    assert sorted(f.old_name for f in res.patched_functions) == ["counter", "same"]
    assert {i["name"]: i["why"] for i in res.report["included"]}["same"] == "forced by KPATCH_FORCE_UNSAFE"


def test_kpatch_ignore_static_gives_a_fresh_copy(cc, tmp_path: Path) -> None:
    ign = 'static char *__ign_count __attribute__((used, section(".kpatch.ignore.data"))) = "count";'
    a, b = cc(MACROS % ("1", ign), "a"), cc(MACROS % ("2", ign), "b")
    res = diff(a, b, tmp_path)
    inc = {i["name"]: i["why"] for i in res.report["included"]}
    count = next(n for n in inc if n.startswith("count"))
    assert "KPATCH_IGNORE_STATIC" in inc[count]
    assert not any(r.symbol.startswith("count") for r in res.klp_relocs)


ISRA = """
struct big { int a, b, c, d, e[16]; };
extern int printk(const char *, ...);
static __attribute__((noinline)) int use_b(struct big *p, int unused) { return p->b * %s + printk("x"); }
int caller1(struct big *p) { return use_b(p, 1); }
int caller2(struct big *p) { return use_b(p, 2) + 1; }
"""


def test_isra_clone_is_patched_under_its_own_name(cc, tmp_path: Path) -> None:
    a, b = cc(ISRA % "5", "a"), cc(ISRA % "7", "b")
    clone = next(n for n in Object.load(a).sym_names if n.startswith("use_b."))
    assert ".isra." in clone
    res = diff(a, b, tmp_path)
    assert [f.old_name for f in res.patched_functions] == [clone]


LOCALALIAS = """
__attribute__((noinline)) int helper(int x) { return x * %s + 1; }
int user(int x) { return helper(x) + helper(x + 1); }
"""


def test_localalias_is_one_function(cc, tmp_path: Path) -> None:
    flags = ("-fPIC", "-fno-semantic-interposition")
    a, b = cc(LOCALALIAS % "3", "a", *flags), cc(LOCALALIAS % "4", "b", *flags)
    assert "helper.localalias" in Object.load(a).sym_names
    twin, why = reason(a, b, "helper.localalias")
    assert twin == "helper.localalias" and why == "same local name"
    res = diff(a, b, tmp_path)
    # helper and helper.localalias are one body at one address: one klp_func, under the global name
    assert [f.old_name for f in res.patched_functions] == ["helper"]


LTO_UNIT = ("static __attribute__((noinline)) int helper(int x) { return x + %s; }\n"
            "int f%s(int x) { return helper(x) * 2; }\n")


def test_lto_priv_renames_correlate_by_code(gcc: str, tmp_path: Path) -> None:
    import subprocess

    def build(name: str, k1: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for unit, src in (("l1", LTO_UNIT % (k1, "1")), ("l2", LTO_UNIT % ("2", "2"))):
            (d / f"{unit}.c").write_text(src)
            subprocess.run([gcc, "-O2", "-flto", "-ffunction-sections", "-pg", "-mfentry", "-c", f"{unit}.c"],
                           cwd=d, check=True)
        subprocess.run([gcc, "-O2", "-flto", "-ffunction-sections", "-pg", "-mfentry", "-r", "-nostdlib",
                        "-flinker-output=nolto-rel", "l1.o", "l2.o", "-o", "lto.o"], cwd=d, check=True)
        return d / "lto.o"

    a, b = build("a", "1"), build("b", "9")
    privs = [n for n in Object.load(a).sym_names if ".lto_priv." in n]
    assert len(privs) == 2
    res = diff(a, b, tmp_path)
    assert len(res.patched_functions) == 1 and ".lto_priv." in res.patched_functions[0].old_name
    # the unchanged twin (l2's helper) matched by identical code, whatever number GCC gave it
    o, p = Object.load(a), Object.load(b)
    c = correlate(o, p)
    reasons = {o.sym_names[i]: c.reasons.get(i, "") for i in range(o.nsym) if ".lto_priv." in o.sym_names[i]}
    assert all(r for r in reasons.values())
