"""Issue 12, items 5-9, 15, 16: the ../shared/cases inputs and their siblings, compiled by the real gcc in the run.

Each case is compiled the way ../shared/cases/compile.sh does (same flags, both sides as ``unit.c``) into
a temporary directory, then diffed through the CLI; what is checked is what the case's expected.txt says.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.diff.arch import ARCHES
from klpforge.diff.lineargs import only_lines_differ

from .conftest import SHARED

CASES = SHARED / "cases"
#: ../shared/cases/compile.sh's flags (read, not called: it writes into the read-only case folder)
CASE_FLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-fno-pic", "-mcmodel=kernel", "-mfentry", "-pg",
              "-mrecord-mcount", "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mno-sse",
              "-fno-strict-aliasing", "-fno-common", "-nostdinc", "-ffreestanding", "-fno-stack-protector"]
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason="../shared/cases not present")


def compile_unit(src: str, d: Path, *extra: str) -> Path:
    """``src`` compiled as ``d/unit.c`` with the case flags; returns the object."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    d.mkdir(parents=True, exist_ok=True)
    (d / "unit.c").write_text(src)
    subprocess.run([gcc, *CASE_FLAGS, *extra, "-c", "unit.c", "-o", "unit.o"], cwd=d, check=True)
    return d / "unit.o"


class Run:
    """One ``klpforge diff`` of an object pair through the CLI: exit code, stderr, the JSON report (when
    written). The symbol table given is ``readelf -s --wide`` of the original, as compile.sh does."""

    def __init__(self, a: Path, b: Path, tmp: Path):
        symtab = tmp / "symtab.txt"
        symtab.write_text(subprocess.run(["readelf", "-s", "--wide", str(a)], capture_output=True, text=True,
                                         check=True).stdout)
        self.out = tmp / "out.o"
        rep = tmp / "report.json"
        r = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(self.out),
                            "--symtab", str(symtab), "--json", str(rep)], capture_output=True, text=True,
                           check=False)
        self.code, self.stderr = r.returncode, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        self.report = json.loads(rep.read_text()) if rep.is_file() and r.returncode == 0 else {}
        # a refusal's line names the first reason; --json lists every one (docs/inputs-outputs.md)
        self.reasons: list[str] = json.loads(rep.read_text()).get("reasons", []) \
            if rep.is_file() and r.returncode != 0 else []

    @classmethod
    def sources(cls, orig_src: str, patched_src: str, tmp: Path, *extra: str) -> Run:
        """Compile both sides with the case flags (plus ``extra``), then diff."""
        return cls(compile_unit(orig_src, tmp / "orig", *extra), compile_unit(patched_src, tmp / "patched", *extra),
                   tmp)

    @property
    def replaced(self) -> list[str]:
        return sorted(f["old_name"] for f in self.report.get("patched_functions", []))

    @property
    def included(self) -> list[str]:
        return sorted(x["name"] for x in self.report.get("included", []) if x["type"] == "function")


def case(name: str, tmp: Path, *extra: str) -> Run:
    d = CASES / name
    return Run.sources((d / "orig.c").read_text(), (d / "patched.c").read_text(), tmp, *extra)


def refused(r: Run, *needles: str) -> None:
    assert r.code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in r.stderr or any(n in x for x in r.reasons) for n in needles), r.stderr
    assert not r.out.exists()


# -- item 5: the __LINE__ filter ------------------------------------------------------------------------------


@needs_cases
def test_case_line_filter_real_change(tmp_path: Path) -> None:
    # expected.txt: dev_tune changed (set_limit's 2nd argument 64 -> 16): replaced, exit 0
    r = case("line-filter-real-change", tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["dev_tune"]
    assert r.report["line_only"] == []


MIGHT = """
extern void __might_sleep(const char *file, int line);
extern void __might_resched(const char *file, int line, unsigned int offsets);
extern int ns_capable(void *ns, int cap);
extern int _printk(const char *fmt, ...);
extern void warn_slowpath_fmt(const char *file, const int line, unsigned taint, const char *fmt, ...);
extern void set_quota(void *q, int blocks);
%(pad)s
int may_admin(void *ns)
{
	__might_sleep(__FILE__, __LINE__);
	return ns_capable(ns, %(cap)s);
}

void tune_quota(void *q, int warn)
{
	_printk("quota\\n");
	if (warn)
		warn_slowpath_fmt(__FILE__, __LINE__, 9, "quota %%d", warn);
	set_quota(q, %(quota)s);
}

void report_limit(void)
{
	_printk("limit %%d\\n", %(limit)s);
}

void resched_point(void)
{
	__might_resched(__FILE__, __LINE__, %(offsets)s);
}
"""
BASE = {"pad": "", "cap": "21", "quota": "100", "limit": "64", "offsets": "0"}


@pytest.mark.parametrize(("what", "value", "func"), [
    ("cap", "12", "may_admin"),  # CAP_SYS_ADMIN -> CAP_NET_ADMIN given to ns_capable after __might_sleep
    ("quota", "200", "tune_quota"),  # a constant to an ordinary function, next to printk and WARN
    ("limit", "16", "report_limit"),  # a printk argument is not a line
    ("offsets", "1", "resched_point"),  # a line-taking helper's *other* argument
])
def test_constant_in_an_argument_register_is_a_change(what: str, value: str, func: str, tmp_path: Path) -> None:
    r = Run.sources(MIGHT % BASE, MIGHT % {**BASE, what: value}, tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == [func] and r.report["line_only"] == []


def test_only_moved_lines_are_still_no_change(tmp_path: Path) -> None:
    r = Run.sources(MIGHT % BASE, MIGHT % {**BASE, "pad": "\n\n\n\n"}, tmp_path)
    assert r.code == 3, r.stderr
    assert "only __LINE__ values moved in may_admin, resched_point, tune_quota" in r.stderr


def test_moved_line_and_real_change_together_is_a_change(tmp_path: Path) -> None:
    r = Run.sources(MIGHT % BASE, MIGHT % {**BASE, "pad": "\n\n", "cap": "12"}, tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["may_admin"]
    assert r.report["line_only"] == ["resched_point", "tune_quota"]


def _le(*words: int) -> bytes:
    return b"".join(struct.pack("<I", w) for w in words)


#: Per architecture: (code loading the file name, the line into the 2nd argument register and calling),
#: the offsets of the file-string and callee relocations, and the same with the line in the 3rd register.
#: and a conditional branch between the load and the call.
SEQS = {
    "x86_64": (lambda n: bytes.fromhex("bf00000000") + b"\xbe" + struct.pack("<I", n) + bytes.fromhex("e800000000"),
               lambda n: bytes.fromhex("bf00000000") + b"\xba" + struct.pack("<I", n) + bytes.fromhex("e800000000"),
               1, 11, lambda n: bytes.fromhex("bf00000000") + b"\xbe" + struct.pack("<I", n) + bytes.fromhex("7400")
               + bytes.fromhex("e800000000")),
    "ppc64le": (lambda n: _le(0x3C620000, 0x38630000, 0x38800000 | n, 0x48000001, 0x60000000),
                lambda n: _le(0x3C620000, 0x38630000, 0x38A00000 | n, 0x48000001, 0x60000000),
                4, 12, lambda n: _le(0x3C620000, 0x38630000, 0x38800000 | n, 0x41820008, 0x48000001, 0x60000000)),
    "s390x": (lambda n: bytes.fromhex("c02000000000a738") + struct.pack(">H", n) + bytes.fromhex("c0e500000000"),
              lambda n: bytes.fromhex("c02000000000a748") + struct.pack(">H", n) + bytes.fromhex("c0e500000000"),
              2, 12, lambda n: bytes.fromhex("c02000000000a738") + struct.pack(">H", n) + bytes.fromhex("a7840002")
              + bytes.fromhex("c0e500000000")),
    "aarch64": (lambda n: _le(0x90000000, 0x91000000, 0x52800001 | (n << 5), 0x94000000),
                lambda n: _le(0x90000000, 0x91000000, 0x52800002 | (n << 5), 0x94000000),
                4, 12, lambda n: _le(0x90000000, 0x91000000, 0x52800001 | (n << 5), 0x54000020, 0x94000000)),
}


@pytest.mark.parametrize("arch_name", sorted(SEQS))
def test_line_rule_per_architecture(arch_name: str) -> None:
    """The rule on each capstone architecture, with the ABI's own registers: a line reaches the helper's
    line parameter at that call; the same immediate anywhere else (another callee, another register,
    across a branch) is a change."""
    arch = next(a for a in ARCHES.values() if a.name == arch_name)
    second, third, file_off, call_off, split = SEQS[arch_name]
    fname = b"kernel/sched/core.c"

    def rel(callee: str, off: int = call_off, with_file: bytes | None = fname) -> list:
        return [(file_off, "", with_file), (off, callee, None)]

    def same(a: bytes, b: bytes, r: list, r2: list | None = None) -> bool:
        return only_lines_differ(arch, a, r, b, r2 or r)

    assert same(second(120), second(125), rel("__might_sleep"))
    assert not same(second(120), second(125), rel("ns_capable", with_file=b"fmt %d\n"))
    assert not same(second(120), second(125), rel("set_quota", with_file=None))
    assert not same(third(120), third(125), rel("__might_sleep", with_file=None))  # not its line parameter
    assert same(third(120), third(125), rel("__btrfs_abort_transaction", with_file=None))  # its 3rd is the line
    # (__FILE__, __LINE__) given to any external call: the line follows the file name
    assert same(second(120), second(125), rel("__warn_printk"))
    assert not same(second(120), second(125), rel("__warn_printk", with_file=b"%s (%d)\n"))
    # a branch between the load and the call: the value may reach something else
    c = len(split(1)) - (len(second(1)) - call_off)
    assert not same(split(120), split(125), rel("__might_sleep", off=c))


def test_loongarch_difference_is_always_a_change() -> None:
    arch = next(a for a in ARCHES.values() if a.name == "loongarch64")
    assert not only_lines_differ(arch, b"\x00" * 8, [], b"\x01" + b"\x00" * 7, [])


# -- item 6: the ftrace entry of the ORIGINAL function counts ---------------------------------------------------


@needs_cases
def test_case_notrace_fix_of_a_traced_function_is_built(tmp_path: Path) -> None:
    # expected.txt: the original spin_forever has __fentry__: the kernel can redirect it, exit 0
    r = case("same-bytes-reloc-lost", tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["spin_forever"]


@needs_cases
def test_case_original_without_entry_is_refused(tmp_path: Path) -> None:
    # expected.txt: the original poke is notrace: refuse naming poke
    r = case("same-bytes-reloc-lost/variant-converse", tmp_path)
    refused(r, "function poke has no ftrace entry in the original object")


NOINSTR = """
extern void touch(int);
%s void probe(int v) { touch(v + %s); }
void other(int v) { touch(v); }
"""


def test_noinstr_added_by_the_fix_is_built(tmp_path: Path) -> None:
    attr = "__attribute__((noinline, __no_instrument_function__, section(\".noinstr.text\")))"
    r = Run.sources(NOINSTR % ("__attribute__((noinline))", "1"), NOINSTR % (attr, "2"), tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["probe"]


def test_fix_to_a_notrace_original_is_refused_even_when_the_copy_is_traced(tmp_path: Path) -> None:
    r = Run.sources(NOINSTR % ("__attribute__((noinline, __no_instrument_function__))", "1"),
            NOINSTR % ("__attribute__((noinline))", "2"), tmp_path)
    refused(r, "function probe has no ftrace entry in the original object")


# -- item 8: section names are matched exactly ------------------------------------------------------------------

EXITS = """
extern void touch(int);
void exit_signals(int v) { touch(v + %(k)s); }
void exit_mm(int v) { touch(v * %(k)s); }
void startup_secondary(int v) { touch(v - %(k)s); }
void unlikely_path(int v) { touch(v ^ %(k)s); }
"""


def test_functions_named_exit_or_startup_are_ordinary(tmp_path: Path) -> None:
    r = Run.sources(EXITS % {"k": "1"}, EXITS % {"k": "3"}, tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["exit_mm", "exit_signals", "startup_secondary", "unlikely_path"]


@pytest.mark.parametrize("sec", [".text.exit", ".text.startup", ".init.text", ".exit.text", ".text.exit.f"])
def test_gcc_and_kernel_init_exit_sections_are_still_refused(sec: str, tmp_path: Path) -> None:
    src = 'extern void touch(int);\n__attribute__((section("' + sec + '"))) void f(int v) {{ touch(v + {}); }}\n'
    r = Run.sources(src.format("1"), src.format("2"), tmp_path)
    refused(r, f"changed function f is in {sec}: init/exit code")


def test_section_name_rules() -> None:
    from klpforge.diff.names import is_string_section, section_subject
    from klpforge.diff.secnames import is_init_section, merge_kind

    for name in (".text.exit_signals", ".text.exit_mm", ".text.startup_64", ".text.exitx", ".init_array",
                 ".text.init.x", ".data.exit"):
        assert not is_init_section(name), name
    for name in (".text.exit", ".text.startup", ".text.startup.main", ".init.text", ".exit.data", ".meminit.text",
                 ".init.rodata"):
        assert is_init_section(name), name
    assert section_subject(".rodata.cstate") == "cstate" and section_subject(".rodata.cst8") is None
    assert section_subject(".rodata.strings") == "strings" and section_subject(".rodata.str1.1") is None
    assert not is_string_section(".rodata.strings", 0) and is_string_section(".rodata.str1.8", 0)
    assert merge_kind(".rodata.foo.cst16") == "cst" and merge_kind(".rodata.cst_table") == ""


CST = """
extern void consume(const void *p);
const char strings[4] = "%s";
const long cstate[2] = { 5, 6 };
void use(void) { consume(strings); consume(cstate); }
"""


def test_data_named_like_merge_sections_is_data(tmp_path: Path) -> None:
    """-fdata-sections puts ``strings`` in .rodata.strings and ``cstate`` in .rodata.cstate: objects, not
    merge sections; changing one is changed data (refused by name), not a string/constant pool."""
    r = Run.sources(CST % "abc", CST % "abd", tmp_path)
    refused(r, "data strings (.rodata.strings) changed")


# -- item 15: objects holding only LTO IR -----------------------------------------------------------------------


@pytest.mark.parametrize("how", [["-c"], ["-r", "-nostdlib"]])
def test_lto_ir_only_object_is_an_input_error(how: list[str], tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    (tmp_path / "l.c").write_text("int f(int x) { return x + 1; }\n")
    subprocess.run([gcc, "-O2", "-flto", *how, "l.c", "-o", "l.o"], cwd=tmp_path, check=True)
    r = subprocess.run([sys.executable, "-m", "klpforge", "diff", "l.o", "l.o", "-o", "out.o", "--symtab", "l.o"],
                       cwd=tmp_path, capture_output=True, text=True, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ("klpforge diff: l.o: holds only LTO IR (GCC's .gnu.lto_* sections, no machine code): "
                                "link with -flinker-output=nolto-rel (or -ffat-lto-objects), or build without -flto")
    assert not (tmp_path / "out.o").exists()


# -- item 7: references into symbol-less shared sections --------------------------------------------------------


@needs_cases
def test_case_rodata_anon_shared(tmp_path: Path) -> None:
    # expected.txt: only seed_low is replaced; seed_high's bytes and its .rodata constant are identical
    r = case("rodata-anon-shared", tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["seed_low"] and "seed_high" not in r.included


@needs_cases
def test_case_rodata_anon_shared_init_user_is_not_refused(tmp_path: Path) -> None:
    """The kept-back form: the unchanged seed_high is __init; comparing it by its own constant keeps it
    unchanged, so it is not refused as changed init code."""
    d = CASES / "rodata-anon-shared"
    init = '__attribute__((section(".init.text"))) void seed_high'
    a, b = ((d / f).read_text().replace("void seed_high", init) for f in ("orig.c", "patched.c"))
    r = Run.sources(a, b, tmp_path)
    assert r.code == 0, r.stderr
    assert r.replaced == ["seed_low"]


CONSTS = """
double scale_a(double x) { return x * %s; }
double scale_b(double x) { return x * 7.25; }
double scale_c(double x) { return x * 9.125; }
"""


def test_merge_constants_compare_one_entry(tmp_path: Path) -> None:
    """.rodata.cst8 holds every function's double constant: only the function whose constant changed is."""
    r = Run.sources(CONSTS % "3.5", CONSTS % "4.5", tmp_path, "-msse2")
    obj = subprocess.run(["readelf", "-SW", str(tmp_path / "orig" / "unit.o")], capture_output=True, text=True,
                         check=True).stdout
    assert ".rodata.cst8" in obj
    assert r.code == 0, r.stderr
    assert r.replaced == ["scale_a"]


def test_anon_extent_stops_at_the_next_referenced_place(tmp_path: Path) -> None:
    """The converse of the case: the constant at the end of the shared .rodata (seed_high's) changes; only
    seed_high changes, seed_low's extent ends where seed_high's constant starts."""
    from klpforge.diff.arch import arch_for
    from klpforge.diff.compare import compare
    from klpforge.diff.correlate import correlate
    from klpforge.diff.model import Object

    d = CASES / "rodata-anon-shared"
    if not d.is_dir():
        pytest.skip("../shared/cases not present")
    src = (d / "orig.c").read_text()
    a = compile_unit(src, tmp_path / "a")
    b = compile_unit(src.replace("1024 }", "1025 }"), tmp_path / "b")
    o, p = Object.load(a), Object.load(b)
    cmp = compare(correlate(o, p), arch_for(o.elf.machine))
    changed = sorted(p.sym_names[i] for i, s in cmp.status.items() if s == "changed")
    assert changed == ["seed_high"]


# -- item 9: aliases of a body whose ftrace entry is a __patchable_function_entries record -----------------------

SYSCALL = """
extern void touch(long);
static long __do_sys_foo(long a) { touch(a + %s); return 0; }
%s long __se_sys_foo(long a) { return __do_sys_foo(a); }
long sys_foo(long a) __attribute__((alias("__se_sys_foo")));
"""
PFE_FLAGS = [f for f in CASE_FLAGS if f not in ("-pg", "-mfentry", "-mrecord-mcount")]


def _pfe_run(tmp: Path, entry: str, orig_attr: str = "") -> Run:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    objs = []
    for side, k, attr in (("orig", "1", orig_attr), ("patched", "2", "")):
        d = tmp / side
        d.mkdir()
        (d / "unit.c").write_text(SYSCALL % (k, attr))
        subprocess.run([gcc, *PFE_FLAGS, f"-fpatchable-function-entry={entry}", "-c", "unit.c", "-o", "unit.o"],
                       cwd=d, check=True)
        objs.append(d / "unit.o")
    return Run(objs[0], objs[1], tmp)


@pytest.mark.parametrize("entry", ["2", "4,2"])  # NOPs at the entry (loongarch64, x86), or partly before (arm64)
def test_alias_of_a_body_with_a_patchable_entry_has_it(entry: str, tmp_path: Path) -> None:
    """SYSCALL_DEFINE's shape: ``sys_foo`` is a global alias of ``__se_sys_foo``; the entry record names
    the place (a section symbol or local label), so every alias at that address has the entry."""
    r = _pfe_run(tmp_path, entry)
    assert r.code == 0, r.stderr
    assert r.replaced == ["sys_foo"]


def test_alias_of_a_body_without_entry_is_refused_by_its_name(tmp_path: Path) -> None:
    r = _pfe_run(tmp_path, "2", "__attribute__((patchable_function_entry(0, 0)))")
    refused(r, "function sys_foo has no ftrace entry in the original object")


def test_entry_record_through_a_local_label_resolves_by_address() -> None:
    """loongarch64's form on a peer object: records against local labels; each resolves to the function
    starting there, and every alias at that address counts."""
    from klpforge.diff.arch import arch_for
    from klpforge.diff.ftrace_entry import with_entry
    from klpforge.diff.model import Object
    from klpforge.elf import constants as C

    from .conftest import PEER

    path = PEER / "loongarch64" / "new-function.ORIG.o"
    if not path.is_file():
        pytest.skip("../shared/peer-objs not present")
    o = Object.load(path)
    funcs = {i for i in range(o.nsym) if o.defined[i] and o.stype[i] == C.STT_FUNC and o.is_text(int(o.shndx[i]))}
    got = with_entry(o, arch_for(o.elf.machine), funcs)
    secs = [s for s in range(o.nsec) if o.sec_names[s] == "__patchable_function_entries"]
    labels = [int(s) for sec in secs for s in o.relocs(sec)["sym"]]
    assert len(labels) > 20 and all(o.stype[s] != C.STT_FUNC for s in labels)  # labels, not functions
    assert len(got) >= len(labels)  # each record gives its function (and any alias) the entry


# -- item 16: one patch parser for build and impact -------------------------------------------------------------

GIT_PATCH = """From 1234 Mon Sep 17 00:00:00 2001
From: A <a@b>
Subject: [PATCH] fix

---
 fs/proc/cmdline.c | 2 +-
 1 file changed

diff --git a/fs/proc/cmdline.c b/fs/proc/cmdline.c
index 1..2 100644
--- a/fs/proc/cmdline.c
+++ b/fs/proc/cmdline.c
@@ -3,3 +3,3 @@ static int f(void)
 a
--- removed line that looks like a header
+-- added line that looks like a header
 c
diff --git a/kernel/new.c b/kernel/new.c
new file mode 100644
--- /dev/null
+++ b/kernel/new.c
@@ -0,0 +1 @@
+int x;
--
2.39.0
"""


@pytest.mark.parametrize(("old", "new"), [("a", "b"), ("src.orig", "src"), ("linux.orig", "linux"),
                                          ("linux-6.1.orig", "linux-6.1")])
def test_prefixes_parse_the_same_for_build_and_impact(old: str, new: str, tmp_path: Path) -> None:
    from klpforge.ipa.patchmap import changed_lines
    from klpforge.kbuild.patchfile import SourcePatch

    p = tmp_path / "fix.patch"
    p.write_text(f"--- {old}/fs/proc/cmdline.c\t2024-01-01 00:00:00\n+++ {new}/fs/proc/cmdline.c\n"
                 "@@ -10,2 +10,2 @@\n ctx\n-old\n+new\n")
    assert SourcePatch.parse(p).files == ("fs/proc/cmdline.c",)
    assert changed_lines(p) == {"fs/proc/cmdline.c": {11}}


def test_git_format_patch_with_header_lookalike_lines(tmp_path: Path) -> None:
    from klpforge.ipa.patchmap import changed_lines
    from klpforge.kbuild.patchfile import SourcePatch
    from klpforge.util.unidiff import parse_patch

    files = parse_patch(GIT_PATCH)
    assert [(f.old, f.new) for f in files] == [("fs/proc/cmdline.c", "fs/proc/cmdline.c"), (None, "kernel/new.c")]
    assert files[0].hunks[0].lines[1] == "--- removed line that looks like a header"
    p = tmp_path / "git.patch"
    p.write_text(GIT_PATCH)
    sp = SourcePatch.parse(p)
    assert sp.files == ("fs/proc/cmdline.c", "kernel/new.c") and sp.created == ("kernel/new.c",)
    assert changed_lines(p) == {"fs/proc/cmdline.c": {4}}


def test_impact_takes_a_kpatch_build_style_patch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``src.orig/`` -> ``src/`` (kpatch-build's -p1 style): the same functions as an a/ b/ patch."""
    from klpforge.cli import main

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    data = Path(__file__).parent / "ipa_data"
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(data / "inline.c", build)
    subprocess.run([gcc, "-O2", "-fdump-ipa-clones", "-ffunction-sections", "-c", "inline.c"], cwd=build, check=True)
    src = (data / "inline.c").read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(src) if "x * 3 + sink" in line)
    body = f"@@ -{i},3 +{i},3 @@\n {src[i - 1]}-{src[i]}+{src[i].replace('x * 3', 'x * 4')} {src[i + 1]}"
    got = []
    for old, new in (("a", "b"), ("src.orig", "src"), ("linux.orig", "linux")):
        patch = tmp_path / f"{old}.patch"
        patch.write_text(f"--- {old}/inline.c\n+++ {new}/inline.c\n{body}")
        assert main(["impact", "--dumps", str(build), "--no-cache", "--json", "--patch", str(patch),
                     "--source", str(data)]) == 0
        got.append(json.loads(capsys.readouterr().out)["functions"])
    assert got == [["top_a", "top_b"]] * 3


def test_refusal_by_path_matches_whole_names() -> None:
    """Item 8's audit in the build's path rules: directory and file names, never bare prefixes/suffixes."""
    from klpforge.kbuild.patchfile import refusal_reason

    for path in ("Makefile", "fs/ext4/Makefile", "arch/x86/Kconfig.debug", "arch/x86/Makefile.um", "fs/Kbuild"):
        assert refusal_reason(path) == "build-system files cannot change in a live patch", path
    for path in ("drivers/net/libfoo/x.c", "fs/ext4/myKbuild.c", "kernel/usr_ns.c", "drivers/Makefile_gen.c",
                 "kernel/toolsx/a.c"):
        assert refusal_reason(path) is None, path
    assert refusal_reason("lib/string.c") is not None and refusal_reason("tools/x.c") is not None


# -- items 5 and 9 on the other architectures, with Debian's cross compilers when installed ----------------------

CROSS = {
    "aarch64": ("aarch64-linux-gnu-gcc", ["-fpatchable-function-entry=2", "-mgeneral-regs-only", "-fno-pic"]),
    "ppc64le": ("powerpc64le-linux-gnu-gcc", ["-pg", "-mprofile-kernel", "-mcmodel=medium"]),
    "s390x": ("s390x-linux-gnu-gcc", ["-pg", "-mfentry", "-mrecord-mcount", "-mnop-mcount", "-fno-pic"]),
}


def _cross_pair(arch: str, orig: str, patched: str, tmp: Path, *extra: str) -> Run:
    cc, flags = CROSS[arch]
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed (Debian gcc-*-linux-gnu; scripts/apt-packages.txt)")
    objs = []
    for side, src in (("orig", orig), ("patched", patched)):
        d = tmp / side
        d.mkdir()
        (d / "unit.c").write_text(src)
        subprocess.run([cc, "-O2", "-ffunction-sections", "-fdata-sections", "-ffreestanding", "-nostdinc", *flags,
                        *extra, "-c", "unit.c", "-o", "unit.o"], cwd=d, check=True)
        objs.append(d / "unit.o")
    return Run(objs[0], objs[1], tmp)


@pytest.mark.parametrize("arch", sorted(CROSS))
@pytest.mark.parametrize(("what", "value", "func"), [("cap", "12", "may_admin"), ("quota", "200", "tune_quota"),
                                                     ("limit", "16", "report_limit"), ("offsets", "1", "resched_point"),
                                                     ("pad", "\n\n\n\n", "")])
def test_line_rule_on_real_cross_compiled_code(arch: str, what: str, value: str, func: str, tmp_path: Path) -> None:
    r = _cross_pair(arch, MIGHT % BASE, MIGHT % {**BASE, what: value}, tmp_path)
    if not func:
        assert r.code == 3, r.stderr
        assert "only __LINE__ values moved in may_admin, resched_point, tune_quota" in r.stderr
        return
    assert r.code == 0, r.stderr
    assert r.replaced == [func] and r.report["line_only"] == []


@pytest.mark.parametrize("arch", ["aarch64", "ppc64le", "s390x"])
def test_syscall_alias_has_the_body_entry_on_real_cross_compiled_code(arch: str, tmp_path: Path) -> None:
    extra = ["-fpatchable-function-entry=4,2"] if arch == "aarch64" else []
    r = _cross_pair(arch, SYSCALL % ("1", ""), SYSCALL % ("2", ""), tmp_path, *extra)
    assert r.code == 0, r.stderr
    assert r.replaced == ["sys_foo"]


def test_tree_sitter_reads_aligned_anonymous_struct_inside_a_function() -> None:
    """Issue 16: ``struct {...} __aligned(X) v;`` in a function body (6.1 nf_conntrack_core.c, nf_nat_core.c)
    was parsed as a nested function definition swallowing the file: the really edited functions showed up as
    "unpredicted". Attribute macros are blanked (lines and columns kept) before parsing."""
    from klpforge.ipa.patchmap import functions_in_source

    src = (b"static int f(struct nf_conn *ct)\n{\n\tstruct {\n\t\tint a;\n\t\tlong b;\n\t} __aligned(8) v;\n"
           b"\tint y = 1;\n\treturn y + v.a;\n}\n\nint __cold g(void)\n{\n\treturn 2;\n}\n"
           b"static struct x { int a; } __packed __attribute__((aligned(4))) h(void)\n{\n\treturn (struct x){0};\n}\n")
    assert functions_in_source(src, {7}) == ["f"]
    assert functions_in_source(src, {13}) == ["g"]
    assert functions_in_source(src, {17}) == ["h"]
