"""Call padding and prefixes travel with their function (issue 16 item 5, issue 15 code generation).

Objects are compiled by the real gcc with the flags of a Linux >= 6.2 kernel with ``CONFIG_CALL_PADDING``
(``-fpatchable-function-entry=16,16 -falign-functions=16``, IBT's ``-fcf-protection=branch``) and, where
``__pfx_`` symbols matter, given them by the real objtool of Debian's linux-source-6.12
(:func:`klpforge.kbuild.objtool.fetch_objtool`, cached). QEMU's software CPU executes no ENDBR check and no
call-depth accounting, so the checks here are structural: the 16 bytes before each included function are
single-byte NOPs (what 7.3's ``arch/x86/kernel/callthunks.c`` ``patch_dest`` demands before writing its
accounting thunk), the function keeps its 16-byte alignment and its ENDBR, and the kernel's objtool, run
on the live patch linked as a module, finds the same prefixes there as in an ordinary build.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.model import Object
from klpforge.elf import constants as C
from klpforge.kbuild.objtool import fetch_objtool
from klpforge.kbuild.testkernel import require_kernel
from klpforge.util.errors import InputError

from .test_cases_diffa import CASE_FLAGS

#: x86 flags of a 6.12 kernel with CALL_PADDING, IBT and return thunks (arch/x86/Makefile, Makefile)
PAD_FLAGS = [*CASE_FLAGS, "-fpatchable-function-entry=16,16", "-falign-functions=16", "-fcf-protection=branch",
             "-mfunction-return=thunk-extern", "-mindirect-branch=thunk-extern", "-mindirect-branch-register"]
#: objtool as 6.12's Kbuild runs it per object on a CALL_PADDING kernel without IBT (scripts/Makefile.lib)
OBJTOOL_PER_OBJECT = ["--prefix=16", "--orc", "--retpoline", "--rethunk", "--static-call"]
ENDBR64 = bytes.fromhex("f30f1efa")


@pytest.fixture(scope="session")
def objtool612() -> Path:
    """objtool of Debian's linux-source-6.12, built once into the cache."""
    try:
        return fetch_objtool()
    except InputError as e:
        if require_kernel():
            pytest.fail(f"KLPFORGE_REQUIRE_KERNEL=1 but objtool 6.12 is not available: {e}")
        pytest.skip(f"objtool 6.12 not available: {e}")


def compile_pair(gcc: str, tmp: Path, orig: str, patched: str, *extra: str, objtool: Path | None = None
                 ) -> tuple[Path, Path]:
    out = []
    for side, src in (("orig", orig), ("patched", patched)):
        d = tmp / side
        d.mkdir(exist_ok=True)
        (d / "unit.c").write_text(src)
        subprocess.run([gcc, *PAD_FLAGS, *extra, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        if objtool is not None:
            r = subprocess.run([str(objtool), *OBJTOOL_PER_OBJECT, "unit.o"], cwd=d, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        out.append(d / "unit.o")
    return out[0], out[1]


def diff(a: Path, b: Path, tmp: Path) -> tuple[list[str], Object]:
    res = run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))
    return sorted(f.old_name for f in res.patched_functions), Object.load(tmp / "lp.o")


def sym(obj: Object, name: str) -> int:
    return obj.sym_names.index(name)


def check_padded(obj: Object, name: str, endbr: bool = True) -> None:
    """``name`` starts 16-byte aligned (with ENDBR unless ``endbr`` is False: gcc gives none to a local
    function whose address is never taken), after 16 single-byte NOPs of its own section."""
    f = sym(obj, name)
    v, data = int(obj.value[f]), obj.section_data(int(obj.shndx[f]))
    assert v >= 16 and v % 16 == 0, f"{name} at {v:#x}"
    assert data[v - 16:v] == b"\x90" * 16, f"{name}: padding {data[v - 16:v].hex()}"
    assert (data[v:v + 4] == ENDBR64) == endbr, f"{name}: ENDBR at its entry: {data[v:v + 4].hex()}"


UNIT = """
extern int ext(int);
int __attribute__((noinline)) foo(int x) { return ext(x) * %s + 1; }
int bar(int x) { return foo(x) + ext(x + 1); }
int baz(int x) { return ext(x) - 2; }
"""


def test_prefix_in_own_section_travels_with_its_function(gcc: str, tmp_path: Path, objtool612: Path) -> None:
    a, b = compile_pair(gcc, tmp_path, UNIT % "3", UNIT % "5", objtool=objtool612)
    o = Object.load(b)
    assert o.is_prefix[sym(o, "__pfx_foo")] and o.pad_start[sym(o, "foo")] == 0
    assert o.syms_in_section[int(o.shndx[sym(o, "foo")])] == [sym(o, "foo")]  # not a shared section
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["foo"]  # never __pfx_foo: a prefix is no function of its own
    pfx = sym(lp, "__pfx_foo")
    assert lp.sbind[pfx] == C.STB_LOCAL and lp.size[pfx] == 16
    assert int(lp.value[pfx]) + 16 == int(lp.value[sym(lp, "foo")])
    check_padded(lp, "foo")
    check_padded(lp, "klpf_vmlinux__foo__0")
    # the ORC entries objtool gave the padding (its cfi is the entry's) came along
    orc_ip = lp.find_section(".orc_unwind_ip")
    assert orc_ip is not None
    text = int(lp.shndx[pfx])
    places = {int(lp.value[int(x["sym"])]) + int(x["addend"]) for x in lp.relocs(orc_ip)
              if int(lp.shndx[int(x["sym"])]) == text}
    assert 0 in places  # .orc_unwind_ip is .long place - .: the padding's entry is at its first byte


def test_shared_text_carves_function_with_its_padding(gcc: str, tmp_path: Path, objtool612: Path) -> None:
    """Without -ffunction-sections every function shares .text: the carved .text holds foo with the 16 bytes
    in front of it, at a 16-byte boundary, and none of its neighbours."""
    a, b = compile_pair(gcc, tmp_path, UNIT % "3", UNIT % "5", "-fno-function-sections", objtool=objtool612)
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["foo"]
    text = lp.find_section(".text")
    assert {lp.sym_names[i] for i in lp.syms_in_section[text]} == {"foo", "klpf_vmlinux__foo__0"}
    check_padded(lp, "foo")
    assert int(lp.shdrs["size"][text]) == 16 + int(lp.size[sym(lp, "foo")])
    assert "__pfx_bar" not in lp.sym_names and "__pfx_baz" not in lp.sym_names


def test_padding_without_prefix_symbols(gcc: str, tmp_path: Path) -> None:
    """On IBT kernels objtool runs on the linked module only: the objects have the padding but no __pfx_
    symbol; __patchable_function_entries says where it starts. A shared section (__sched) keeps it too."""
    src = UNIT.replace("int __attribute__((noinline)) foo",
                       "__attribute__((section(\".sched.text\"), noinline)) int foo")
    src = src.replace("int baz", "__attribute__((section(\".sched.text\"))) int baz")
    a, b = compile_pair(gcc, tmp_path, src % "3", src % "5")
    o = Object.load(b)
    assert not any(o.is_prefix) and o.pad_start[sym(o, "foo")] == int(o.value[sym(o, "foo")]) - 16
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["foo"]
    sched = lp.find_section(".sched.text")
    assert int(lp.shdrs["size"][sched]) == 16 + int(lp.size[sym(lp, "foo")])  # baz carved away, padding kept
    check_padded(lp, "foo")


def test_objects_without_padding_are_unchanged(gcc: str, tmp_path: Path) -> None:
    """6.1 objects (no call padding): no prefix, no padding, foo at offset 0 of its own section."""
    a, b = (p for p in compile_pair(gcc, tmp_path, UNIT % "3", UNIT % "5"))
    for side in ("orig", "patched"):
        d = tmp_path / side
        subprocess.run([gcc, *CASE_FLAGS, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
    o = Object.load(b)
    assert not o.pad_start and not any(o.is_prefix)
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["foo"] and int(lp.value[sym(lp, "foo")]) == 0


COLD_ALIAS = """
extern void report(const char *, int) __attribute__((cold));
extern int ext(int);
int process(int *p, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < 0) { report("x", i); ext(s); return -1; }
        s += p[i] * %s;
    }
    return s;
}
int process_alias(int *p, int n) __attribute__((alias("process")));
"""


def test_cold_part_and_alias_keep_their_prefixes(gcc: str, tmp_path: Path, objtool612: Path) -> None:
    a, b = compile_pair(gcc, tmp_path, COLD_ALIAS % "3", COLD_ALIAS % "5", objtool=objtool612)
    o = Object.load(b)
    assert {"__pfx_process", "__pfx_process_alias", "process.cold"} <= set(o.sym_names)
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["process"]  # one klp_func for the body the alias shares
    assert {"process", "process_alias", "process.cold", "__pfx_process", "__pfx_process_alias"} <= set(lp.sym_names)
    check_padded(lp, "process")
    for n in ("__pfx_process", "__pfx_process_alias"):
        assert int(lp.value[sym(lp, n)]) + 16 == int(lp.value[sym(lp, "process")])


ICF = """
extern int ext(int);
static __attribute__((noinline)) int sum_front(int *v, int n)
{ int s = 0; for (int i = 0; i < n; i++) s += v[i] * 7; return ext(s); }
static __attribute__((noinline)) int sum_back(int *v, int n)
{ int s = 0; for (int i = 0; i < n; i++) s += v[i] * 7; return ext(s); }
int use_front(int *v, int n) { return sum_front(v, n) + 1; }
int use_back(int *v, int n) { return sum_back(v, n) + 2; }
"""


def test_icf_folded_members_with_prefixes(gcc: str, tmp_path: Path, objtool612: Path) -> None:
    """A fold of two members with call padding: prefixes are never taken for folded functions; the member
    the fix edits is replaced with its padding, the other keeps its old body (copied, padded too)."""
    patched_src = ICF.replace("v[i] * 7", "v[i] * 9", 1)
    a, b = compile_pair(gcc, tmp_path, ICF, patched_src, objtool=objtool612)
    o = Object.load(a)
    f, k = sym(o, "sum_front"), sym(o, "sum_back")
    if not (o.shndx[f] == o.shndx[k] and o.value[f] == o.value[k]):
        pytest.skip("gcc did not fold sum_front and sum_back")
    from klpforge.diff.icf import fold_groups

    assert all(not o.is_prefix[i] for g in fold_groups(o) for i in g)
    patched, lp = diff(a, b, tmp_path)
    assert "sum_front" in patched
    check_padded(lp, "sum_front", endbr=False)  # static, never address-taken: no ENDBR, as in the original
    assert Object.load(a).section_data(int(o.shndx[f]))[int(o.value[f]):int(o.value[f]) + 4] != ENDBR64


def test_objtool_finds_the_same_prefixes_in_the_live_patch(gcc: str, tmp_path: Path, objtool612: Path) -> None:
    """The kernel's objtool (6.12, --prefix=16 as for a module on an IBT kernel) run on the live patch
    linked like a module makes __pfx_ for exactly the included functions of an ordinary build: the
    padding it needs is there, 16 NOPs, in front of each."""
    a, b = compile_pair(gcc, tmp_path, UNIT % "3", UNIT % "5", "-fno-function-sections")
    diff(a, b, tmp_path)
    from klpforge.diff.emit.postlink import strip_klp

    link = tmp_path / "lp.link.o"
    strip_klp(tmp_path / "lp.o", link)
    mod = tmp_path / "mod.o"
    subprocess.run(["ld", "-r", "-o", str(mod), str(link)], check=True)
    ordinary = tmp_path / "ordinary.o"
    subprocess.run(["ld", "-r", "-o", str(ordinary), str(b)], check=True)
    for obj in (mod, ordinary):
        r = subprocess.run([str(objtool612), "--prefix=16", "--ibt", "--orc", "--rethunk", "--retpoline",
                            "--link", "--module", str(obj)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    got = {n for n in Object.load(mod).sym_names if n.startswith("__pfx_")}
    want = {n for n in Object.load(ordinary).sym_names if n.startswith("__pfx_")}
    assert got == {"__pfx_foo", "__pfx_klpf_vmlinux__foo__0"} and "__pfx_foo" in want


SITES = """
extern int ext(int);
extern int (*hook)(int);
static __attribute__((noinline)) int helper(int x) { return ext(x) + hook(x); }
int foo(int x) { return helper(x) * %s + hook(x + 1); }
int bar(int x) { return helper(x) - ext(x * 3); }
"""
#: the per-site tables objtool (6.12) writes, each entry ``.long site - .``
SITE_TABLES = (".return_sites", ".retpoline_sites", ".call_sites", ".ibt_endbr_seal", ".orc_unwind_ip")


def sites(path: Path, table: str, funcs: set[str]) -> set[tuple[str, int]]:
    """(function, offset in it) of every ``table`` entry of object ``path`` in one of ``funcs``."""
    o = Object.load(path)
    out = set()
    for t in [i for i, n in enumerate(o.sec_names) if n == table]:
        for x in o.relocs(t):
            s = int(x["sym"])
            sec, place = int(o.shndx[s]), int(o.value[s]) + int(x["addend"])
            cands = [m for m in o.syms_in_section.get(sec, []) if o.code_range(m)[0] <= place < o.code_range(m)[1]]
            names = {o.sym_names[m].removeprefix("klpf_vmlinux__").removesuffix("__0") for m in cands}
            for m in cands:
                if o.sym_names[m] in funcs:
                    out.add((o.sym_names[m], place - int(o.value[m])))
            assert names <= funcs | {"helper", "bar", "foo", "core_init", "core_exit"}, names
    return out


@pytest.mark.parametrize("layout", ["-ffunction-sections", "-fno-function-sections"])
def test_site_tables_match_objtool_on_an_ordinary_module(gcc: str, tmp_path: Path, objtool612: Path,
                                                         layout: str) -> None:
    """Linked as a module (IBT kernels run objtool on the linked module only), the live patch gives the
    kernel's objtool every call and return where it is: the sites it lists for the included functions
    (return thunks, retpolines, call-depth call sites, sealed ENDBRs, ORC) are those it lists for the
    same functions in an ordinary module built from the patched object."""
    a, b = compile_pair(gcc, tmp_path, SITES % "3", SITES % "5", layout)
    patched, _ = diff(a, b, tmp_path)
    assert patched == ["foo"]
    from klpforge.diff.emit.postlink import strip_klp

    strip_klp(tmp_path / "lp.o", tmp_path / "lp.link.o")
    mod, ordinary = tmp_path / "mod.o", tmp_path / "ordinary.o"
    subprocess.run(["ld", "-r", "-o", str(mod), str(tmp_path / "lp.link.o")], check=True)
    subprocess.run(["ld", "-r", "-o", str(ordinary), str(b)], check=True)
    args = ["--hacks=skylake", "--ibt", "--orc", "--retpoline", "--rethunk", "--prefix=16", "--link", "--module"]
    for obj in (mod, ordinary):
        r = subprocess.run([str(objtool612), *args, str(obj)], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    for table in SITE_TABLES:
        got, want = sites(mod, table, {"foo"}), sites(ordinary, table, {"foo"})
        assert got == want, table
        if table != ".ibt_endbr_seal":
            assert got, table


#: a single-object module's code: objtool already ran on it when Kbuild compiled it (6.12 scripts/Makefile.lib:
#: with objtool delayed, ``objtool-enabled`` is ``is-single-obj-m``); foo has a WARN-like ud2 that objtool must
#: know continues (.discard.reachable, include/linux/objtool.h ANNOTATE_REACHABLE)
SINGLE = """
extern int ext(int);
extern int (*hook)(int);
static __attribute__((noinline)) int helper(int x) { return ext(x) + hook(x); }
int foo(int x)
{
	if (x > 1000)
		asm volatile("1: ud2\\n.pushsection .discard.reachable\\n.long 1b\\n.popsection\\n");
	return helper(x) * %s + hook(x + 1);
}
int bar(int x) { return helper(x) - ext(x * 3); }
"""
#: the generated module core: init and exit of its own, compiled by Kbuild and never objtool'd before the link
CORE = """
extern int klp_enable_patch(void *);
extern void *patch;
int __attribute__((section(".init.text"))) core_init(void) { return klp_enable_patch(patch) + 1; }
void __attribute__((section(".exit.text"))) core_exit(void) { }
"""
#: a 6.12 IBT kernel's config as objtool's flags and tables read it (Debian's 6.12 and 7.3)
IBT_CONFIG = {"CONFIG_X86_KERNEL_IBT": "y", "CONFIG_UNWINDER_ORC": "y", "CONFIG_MITIGATION_RETPOLINE": "y",
              "CONFIG_MITIGATION_RETHUNK": "y", "CONFIG_MITIGATION_CALL_DEPTH_TRACKING": "y",
              "CONFIG_HAVE_STATIC_CALL_INLINE": "y", "CONFIG_PREFIX_SYMBOLS": "y",
              "CONFIG_FUNCTION_PADDING_BYTES": "16"}


def test_member_objtool_already_ran_on_gets_all_tables_at_the_link(gcc: str, tmp_path: Path,
                                                                   objtool612: Path) -> None:
    """The pppoe case of issue 15 as a kind: a diff object whose original went through objtool (a single-object
    module) carries objtool's tables; linked with the module core and given to objtool at the link as it is,
    objtool skips every table ("file already has .return_sites, skipping") and the core's exit keeps an unlisted
    jmp to the return thunk (6.12 warns "Unpatched return thunk in use" at rmmod) and no ORC. link_ready hands
    it over as Kbuild hands over any member of an ordinary module: objtool then writes every table for the
    whole module; the included function's entries are those objtool gave the ordinary build (ORC bytes too),
    its annotation kept it from treating the ud2 as a dead end, and each function has one __pfx_."""
    from klpforge.diff.emit.postlink import strip_klp
    from klpforge.kbuild.module import check_orc, check_sites
    from klpforge.kbuild.objtool import generated_tables, link_ready, objtool_args

    args = objtool_args(IBT_CONFIG, module=True)
    assert args[-2:] == ["--link", "--module"] and "--hacks=skylake" in args
    a, b = compile_pair(gcc, tmp_path, SINGLE % "3", SINGLE % "5", "-ffunction-sections")  # as klpforge compiles
    for obj in (a, b):  # Kbuild's compile-time run on a single-object module
        r = subprocess.run([str(objtool612), *args, str(obj)], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    patched, lp = diff(a, b, tmp_path)
    assert patched == ["foo"]
    assert {".return_sites", ".orc_unwind", ".discard.reachable"} <= set(lp.sec_names)
    strip_klp(tmp_path / "lp.o", tmp_path / "lp.link.o")
    core = tmp_path / "core.o"
    (tmp_path / "core.c").write_text(CORE)
    subprocess.run([gcc, *PAD_FLAGS, "-c", str(tmp_path / "core.c"), "-o", str(core)], check=True)
    # gcc 12 writes one __patchable_function_entries for a whole object, which the diff's cut table no longer
    # orders by link (gcc 14 writes one per function); ld refuses to mix the two forms, and the table has no
    # part in objtool's: the stand-in core goes without it
    subprocess.run(["objcopy", "--remove-section=__patchable_function_entries",
                    "--remove-section=.rela__patchable_function_entries", str(core)], check=True)
    subprocess.run(["objcopy", "--remove-section=__patchable_function_entries",
                    "--remove-section=.rela__patchable_function_entries", str(tmp_path / "lp.link.o")], check=True)

    def link(member: Path, name: str) -> tuple[Path, str]:
        mod = tmp_path / name
        subprocess.run(["ld", "-r", "-o", str(mod), str(core), str(member)], check=True)
        r = subprocess.run([str(objtool612), *args, str(mod)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return mod, r.stderr

    _, said = link(tmp_path / "lp.link.o", "as-is.o")  # what the link did before: tables skipped
    assert "file already has .return_sites, skipping" in said
    ready = tmp_path / "lp.ready.o"
    dropped = link_ready(tmp_path / "lp.link.o", ready, IBT_CONFIG)
    assert {".return_sites", ".call_sites", ".orc_unwind", ".orc_unwind_ip"} <= set(dropped)
    assert {n for n in dropped if not n.startswith(".rela")} <= set(generated_tables(IBT_CONFIG))
    mod, said = link(ready, "mod.o")
    assert "already has" not in said and "warning" not in said, said
    for table in SITE_TABLES:
        got, want = sites(mod, table, {"foo"}), sites(b, table, {"foo"})
        assert got == want, table
    ko = tmp_path / "mod.ko.o"
    ko.write_bytes(mod.read_bytes())
    check_sites(ko, IBT_CONFIG, tmp_path / "log")  # core_exit's return is a listed site
    check_orc(ko, None, [], tmp_path / "log")  # every function, the core's too
    names = Object.load(mod).sym_names
    assert names.count("__pfx_foo") == 1 and names.count("__pfx_core_exit") == 1
    # the same checks refuse what the link made before
    from klpforge.util.errors import UnsafeChange

    with pytest.raises(UnsafeChange, match=r"2 __x86_return_thunk site\(s\) that .return_sites does not list "
                                           r"\(core_init \(.init.text\+0x[0-9a-f]+\), core_exit"):
        check_sites(tmp_path / "as-is.o", IBT_CONFIG, tmp_path / "log")
