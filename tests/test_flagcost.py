"""klpforge flag-cost: each reason reproduced with the real gcc, the command end to end on a fake Kbuild tree
(which must stay untouched), the LTO refusal, and the prepared test kernel."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from klpforge.flagcost.measure import BuildPair, ObjectCost, measure_object

ROOT = Path(__file__).resolve().parent.parent
#: kernel-like flags; -pg turns IPA-RA off in gcc (toplev.cc), so the IPA-RA case leaves it out
KFLAGS = ["-O2", "-fno-PIE", "-fno-asynchronous-unwind-tables", "-pg", "-mfentry"]


def _pair(gcc: str, tmp: Path, src: str, flag: str, flags: list[str] = KFLAGS) -> ObjectCost:
    """Compile ``src`` as built and with ``flag`` (sections and ipa-clones dumps on), measure the pair."""
    outs = {}
    for tag, extra in (("built", []), ("flag", [flag])):
        d = tmp / tag
        d.mkdir(exist_ok=True)
        (d / "unit.c").write_text(src)
        subprocess.run([gcc, *flags, "-ffunction-sections", "-fdata-sections", "-fdump-ipa-clones", *extra,
                        "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        outs[tag] = d
    pair = BuildPair(outs["built"] / "unit.o", outs["flag"] / "unit.o",
                     outs["built"] / "unit.c.000i.ipa-clones", outs["flag"] / "unit.c.000i.ipa-clones",
                     ipa_ra="-pg" not in flags, flag_text=flag)
    return measure_object("unit.o", pair)


def _func(cost: ObjectCost, name: str):
    got = [f for f in cost.functions if f.name == name]
    assert got, f"{name} not in {[f.name for f in cost.functions]}"
    return got[0]


def _kinds(cost: ObjectCost, name: str) -> set[str]:
    return {r.kind for r in _func(cost, name).reasons}


GLOBAL_INLINE = r"""
int g(int x) { return x * 7 + (x >> 3); }
int f(int a) { return g(a) + 1; }
"""


def test_inlining_forbidden(gcc: str, tmp_path: Path) -> None:
    # inline-only-static forbids inlining a global function: f calls g instead of holding its body
    cost = _pair(gcc, tmp_path, GLOBAL_INLINE, "-flive-patching=inline-only-static")
    f = _func(cost, "f")
    assert f.status == "changed"
    assert _kinds(cost, "f") == {"inline"}
    assert "`g` inlined in the build, called with the flag" in f.reasons[0].detail
    assert _func(cost, "g").status == "same"
    # the benefit side: a patch to g must replace f too in the build, only g with the flag
    g = _func(cost, "g")
    assert (g.impact_built, g.impact_flag) == (2, 1)


CONSTPROP = r"""
extern int ext(int);
static __attribute__((noinline)) int scale(int x, int k)
{
    int s = 0;
    for (int i = 0; i < x; i++)
        s += ext(i * k) + k;
    return s;
}
int user1(int x) { return scale(x, 3); }
int user2(int x) { return scale(x + 1, 3); }
"""


def test_clone_forbidden(gcc: str, tmp_path: Path) -> None:
    cost = _pair(gcc, tmp_path, CONSTPROP, "-flive-patching=inline-only-static")
    assert cost.clones_built == 1 and cost.clones_flag == 0 and cost.clones_avoided == 1
    for user in ("user1", "user2"):
        u = _func(cost, user)
        assert "clone" in _kinds(cost, user), u.reasons
        assert "`scale.constprop.0` in the build, `scale` with the flag" in " ".join(r.detail for r in u.reasons)
    clone = _func(cost, "scale.constprop.0")
    assert clone.status == "built-only" and clone.reasons[0].kind == "clone"
    plain = _func(cost, "scale")
    assert plain.status == "flag-only" and plain.reasons[0].kind == "clone"
    # a patch to the clone must replace its callers in the build; with the flag only scale itself
    assert clone.impact_built == 3 and plain.impact_flag == 1


IPA_RA = r"""
__attribute__((noinline)) int leaf(int x) { return x * 3 + 1; }
int ra_caller(int a, int b) { int t = leaf(a); return t + leaf(b) + a * b; }
"""


def test_ipa_ra_caller(gcc: str, tmp_path: Path) -> None:
    cost = _pair(gcc, tmp_path, IPA_RA, "-flive-patching=inline-clone", ["-O2", "-fno-PIE"])
    r = _func(cost, "ra_caller")
    assert r.status == "changed" and r.growth > 0  # callee-saved registers pushed and popped with the flag
    assert _kinds(cost, "ra_caller") == {"ipa-ra"}
    assert "live across its call to `leaf`" in r.reasons[0].detail
    assert _func(cost, "leaf").status == "same"


def test_ipa_ra_is_off_under_pg(gcc: str, tmp_path: Path) -> None:
    # the same source with ftrace's -pg: gcc already disabled IPA-RA, the flag changes nothing
    cost = _pair(gcc, tmp_path, IPA_RA, "-flive-patching=inline-clone")
    assert _func(cost, "ra_caller").status == "same"


PURE_CONST = r"""
extern void ext(int);
static __attribute__((noinline)) int csq(int x) { return x * x + 7; }
int pc_caller(int a) { return csq(a) + csq(a); }
static __attribute__((noinline)) void die(int x) { ext(x); for (;;) ext(x); }
int nr_caller(int a) { if (a > 3) die(a); ext(1); return a + 1; }
"""


def test_pure_const_and_noreturn(gcc: str, tmp_path: Path) -> None:
    cost = _pair(gcc, tmp_path, PURE_CONST, "-flive-patching=inline-clone")
    pc = _func(cost, "pc_caller")
    assert _kinds(cost, "pc_caller") == {"pure-const"}
    assert "2 reference(s) to `csq` with the flag, 1 in the build" in pc.reasons[0].detail
    nr = _func(cost, "nr_caller")
    assert _kinds(cost, "nr_caller") == {"pure-const"}
    assert "`die` never returns" in nr.reasons[0].detail
    assert _func(cost, "csq").status == "same" and _func(cost, "die").status == "same"


ICF = r"""
#define NI __attribute__((noinline))
static NI int s_a(int *p, int n) { int s = 0; for (int i = 0; i < n; i++) s += p[i] * 5; return s; }
static NI int s_b(int *p, int n) { int s = 0; for (int i = 0; i < n; i++) s += p[i] * 5; return s; }
int use_ab(int *p, int n) { return s_a(p, n) + s_b(p + 1, n); }
"""


def test_identical_code_folding(gcc: str, tmp_path: Path) -> None:
    cost = _pair(gcc, tmp_path, ICF, "-flive-patching=inline-clone")
    sb = _func(cost, "s_b")
    assert sb.status == "changed" and sb.size_built == 0 and sb.size_flag == _func(cost, "s_a").size_flag
    assert _kinds(cost, "s_b") == {"icf"} and "`s_a`" in sb.reasons[0].detail
    assert _kinds(cost, "use_ab") == {"icf"}
    assert cost.text_flag - cost.text_built == sb.size_flag


MODREF = r"""
struct rf { int flags; int cookie; };
extern void ext_unlock(void);
extern int glob;
__attribute__((noinline)) void activate(int *p, struct rf *rf) { *p += rf->cookie; }
int ttwu(int *p)
{
    struct rf rf = { 0, 3 };
    activate(p, &rf);
    if (glob > 2)
        rf.flags = 4;   /* dead unless activate() let &rf escape: modref says it does not */
    ext_unlock();
    return 0;
}
"""


def test_callee_summary(gcc: str, tmp_path: Path) -> None:
    # try_to_wake_up's rq_unpin_lock() pattern (docs/flag-cost.md): without modref's summary of activate(),
    # the store to the local and its test come back after the call
    cost = _pair(gcc, tmp_path, MODREF, "-flive-patching=inline-clone")
    t = _func(cost, "ttwu")
    assert t.status == "changed" and t.growth > 0
    assert t.reasons[0].kind == "callee-ipa"
    assert "right after its calls to `activate` (1 of 1 call sites" in t.reasons[0].detail
    assert _func(cost, "activate").status == "same"


# -- the command, end to end -------------------------------------------------------------------------------

TREE_SRC = GLOBAL_INLINE + PURE_CONST + ICF


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = Path(d) / f
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _fake_tree(tmp: Path, gcc: str, extra: str = "") -> tuple[Path, Path]:
    """A source tree and an O= build dir whose .cmd records a Kbuild-style command (dep file, objtool-like
    post-step writing into the tree) for sub/dir/unit.o."""
    src, build = tmp / "src", tmp / "build"
    (src / "sub/dir").mkdir(parents=True)
    (src / "Makefile").write_text("# fake\n")
    (src / "sub/dir/unit.c").write_text(TREE_SRC)
    (build / "sub/dir").mkdir(parents=True)
    cmd = (f"{gcc} -Wp,-MMD,sub/dir/.unit.o.d {' '.join(KFLAGS)} {extra} -DKBUILD_MODNAME='\"unit\"' "
           f"-c -o sub/dir/unit.o {src}/sub/dir/unit.c ; echo post > sub/dir/.unit.post")
    (build / "sub/dir/.unit.o.cmd").write_text(
        f"cmd_sub/dir/unit.o := {cmd}\n\nsource_sub/dir/unit.o := {src}/sub/dir/unit.c\n\ndeps_sub/dir/unit.o := \\\n")
    return src, build


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "klpforge", "flag-cost", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_command_on_fake_tree(gcc: str, tmp_path: Path) -> None:
    src, build = _fake_tree(tmp_path, gcc)
    before = _snapshot(tmp_path)
    out = tmp_path.parent / f"{tmp_path.name}-out"
    out.mkdir()
    r = _cli("-s", str(src), "-O", str(build), "-j", "2", "sub/", "--json", str(out / "r.json"),
             "--svg", str(out / "svg"))
    assert r.returncode == 0, r.stderr
    assert _snapshot(tmp_path) == before  # nothing written into the trees (no object, .d, dump or post-step)
    doc = json.loads((out / "r.json").read_text())
    funcs = {f["name"]: f for f in doc["functions"]}
    assert {k["kind"] for k in funcs["pc_caller"]["reasons"]} == {"pure-const"}
    assert {k["kind"] for k in funcs["s_b"]["reasons"]} == {"icf"}
    assert funcs["f"]["status"] == "same"  # inline-clone keeps inlining
    tot = doc["directories"]["sub/dir"]
    assert tot["changed"] == 4 and tot["growth"] == sum(f["growth"] for f in doc["functions"]) > 0
    assert doc["total"]["reasons"]["icf"] == 2
    assert any("IPA-RA was already off" in n for n in doc["notes"])
    svg = (out / "svg" / "sub_dir.svg").read_text()
    assert svg.startswith("<svg") and "unit.o" in svg and f"{tot['growth']:+d} B, 4/" in svg
    assert "pc_caller" in r.stdout and "pure-const" in r.stdout


def test_command_refuses_lto(gcc: str, tmp_path: Path) -> None:
    src, build = _fake_tree(tmp_path, gcc, extra="-flto")
    out = tmp_path / "r.json"
    r = _cli("-s", str(src), "-O", str(build), "sub/dir/unit.o", "--json", str(out))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "live patching is not supported with LTO" in r.stderr
    assert not out.exists()


def test_gcc_itself_refuses_lto(gcc: str, tmp_path: Path) -> None:
    # the refusal quotes gcc 12's own words
    (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
    r = subprocess.run([gcc, "-O2", "-flto", "-flive-patching=inline-clone", "-c", "x.c"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "live patching is not supported with LTO" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["nosuch/"], "nosuch: neither an object (.o) nor a directory of the tree"),
    (["sub/dir/other.o"], "sub/dir/other.o: no sub/dir/other.c in"),
    (["--flag=-flive-patching=bogus", "sub/"], "the command with -flive-patching=bogus failed"),
    (["--json", "/nonexistent/r.json", "sub/"], "directory /nonexistent does not exist"),
])
def test_command_bad_input(gcc: str, tmp_path: Path, args: list[str], message: str) -> None:
    src, build = _fake_tree(tmp_path, gcc)
    r = _cli("-s", str(src), "-O", str(build), *args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


# -- the prepared test kernel ------------------------------------------------------------------------------

def _text_sizes(path: Path) -> tuple[int, dict[str, int]]:
    with path.open("rb") as f:
        elf = ELFFile(f)
        text = sum(s["sh_size"] for s in elf.iter_sections() if s["sh_flags"] & 0x6 == 0x6)
        syms = {s.name: s["st_size"] for s in elf.get_section_by_name(".symtab").iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC"}
    return text, syms


@pytest.mark.kernel
def test_command_on_test_kernel(kernel, tmp_path: Path) -> None:
    before = _snapshot(kernel.build / "kernel/sched")
    keep = tmp_path / "keep"
    r = _cli("-s", str(kernel.src), "-O", str(kernel.build), "-j", "2", "kernel/sched/", "--json",
             str(tmp_path / "r.json"), "--keep", str(keep))
    assert r.returncode == 0, r.stderr
    assert _snapshot(kernel.build / "kernel/sched") == before
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["objects"]) >= {"kernel/sched/core.o", "kernel/sched/fair.o"}
    # text sizes and per-function sizes agree with what pyelftools reads from the two builds
    for obj, s in doc["objects"].items():
        tb, sb = _text_sizes(keep / "built" / obj)
        tf, sf = _text_sizes(keep / "flag" / obj)
        assert (s["text_built"], s["text_flag"]) == (tb, tf)
        for f in (x for x in doc["functions"] if x["object"] == obj and x["status"] == "changed"):
            if f["size_built"]:  # 0 is a folded alias
                assert sb[f.get("built_name", f["name"])] == f["size_built"]
            assert sf[f["name"]] == f["size_flag"]
    changed = [f for f in doc["functions"] if f["status"] != "same"]
    assert changed and doc["total"]["changed"] == len([f for f in changed if ".cold" not in f["name"]])
    assert all(f["reasons"] for f in changed)
    assert any(k != "unexplained" for f in changed for k in (x["kind"] for x in f["reasons"]))
    assert any("IPA-RA was already off" in n for n in doc["notes"])  # the kernel builds with -pg


@pytest.mark.parametrize("args, message", [
    (["--distro", "fedora:38", "sub/"], "--distro fedora:38: expected debian:RELEASE"),
    (["--distro", "debian:6.1.0-56-amd64", "-s", "/tmp", "sub/"], "give either --distro or -s/-O, not both"),
    (["sub/"], "give the kernel source tree with -s"),
])
def test_command_bad_tree(args: list[str], message: str) -> None:
    r = _cli(*args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


# -- a distribution's configuration (--distro) --------------------------------------------------------------

DEBIAN_RELEASE = "6.1.0-56-amd64"


@pytest.mark.kernel
def test_command_distro_debian(tmp_path: Path) -> None:
    """Debian's shipped 6.1 config through the distribution backend's prepared (unbuilt) tree: the object is
    built by Kbuild in a private copy, the cached tree is left as it was; in the build IPA-CP made
    ``ext4_find_shared.constprop.0``, with the flag it did not (docs/flag-cost.md, spot check 3)."""
    debian = pytest.importorskip("klpforge.distro.debian")
    root = debian.release_root(DEBIAN_RELEASE)
    if not (root / "prepared.json").is_file() and not (os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1"
                                                       or os.environ.get("KLPFORGE_DISTRO") == "1"):
        pytest.skip(f"Debian {DEBIAN_RELEASE} not prepared (KLPFORGE_DISTRO=1 downloads and prepares it)")
    tree = debian.prepare_tree(DEBIAN_RELEASE)
    before = _snapshot(Path(tree.build))
    r = _cli("--distro", f"debian:{DEBIAN_RELEASE}", "-j", "2", "fs/ext4/indirect.o", "--json",
             str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert _snapshot(Path(tree.build)) == before
    doc = json.loads((tmp_path / "r.json").read_text())
    funcs = {f["name"]: f for f in doc["functions"]}
    clone = funcs["ext4_find_shared.constprop.0"]
    assert clone["status"] == "built-only" and clone["reasons"][0]["kind"] == "clone"
    assert funcs["ext4_find_shared"]["status"] == "flag-only"
    assert {x["kind"] for x in funcs["ext4_ind_truncate"]["reasons"]} == {"clone"}
    assert doc["objects"]["fs/ext4/indirect.o"]["clones_avoided"] == 1


FAKE_KBUILD = """\
# A stand-in for Kbuild's single-directory target: `make -C SRC O=BUILD sub/` compiles the unit into
# BUILD and records its command there, as Linux 6.1 does in .unit.o.cmd.
CMD = {gcc} {flags} -c -o sub/dir/unit.o $(CURDIR)/sub/dir/unit.c
.PHONY: sub/
sub/:
\tmkdir -p $(O)/sub/dir
\tcd $(O) && $(CMD)
\tprintf 'cmd_sub/dir/unit.o := %s\\n\\nsource_sub/dir/unit.o := %s\\n' '$(CMD)' '$(CURDIR)/sub/dir/unit.c' \
> $(O)/sub/dir/.unit.o.cmd
"""


def test_record_in_private_copy(gcc: str, tmp_path: Path) -> None:
    """A prepared but unbuilt tree (what --distro gets): the objects are built by "Kbuild" in a copy of the
    build directory, whose recorded commands then run there; the prepared tree gains nothing."""
    from klpforge.flagcost.compile import compile_argv
    from klpforge.flagcost.sources import find_units, plain_make

    src, build, work = tmp_path / "src", tmp_path / "build", tmp_path / "work"
    (src / "sub/dir").mkdir(parents=True)
    (src / "sub/dir/unit.c").write_text(TREE_SRC)
    (src / "Makefile").write_text(FAKE_KBUILD.format(gcc=gcc, flags=" ".join(KFLAGS)))
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    work.mkdir()
    before = _snapshot(tmp_path / "build")
    with pytest.raises(Exception, match="no object compiled from C"):
        find_units(src, build, ["sub/"])  # without recording: nothing is built
    units = find_units(src, build, ["sub/"], record=True, workdir=work, jobs=1, make=plain_make(src))
    assert [u.obj for u in units] == ["sub/dir/unit.o"]
    assert units[0].cwd == work / "kbuild" and (work / "kbuild/include/generated/autoconf.h").is_file()
    assert _snapshot(tmp_path / "build") == before
    out = tmp_path / "out/unit.o"
    out.parent.mkdir()
    argv = compile_argv(units[0].command, out, ["-flive-patching=inline-clone"])
    subprocess.run(argv, cwd=units[0].cwd, check=True)
    assert out.is_file() and (out.parent / "unit.c.000i.ipa-clones").is_file()


def test_interrupt_starts_no_queued_compile(tmp_path: Path) -> None:
    """Ctrl-C while compiling: the error propagates and no compile still queued is started."""
    import signal
    import threading

    from klpforge.flagcost.compile import CompileJob, run_jobs

    jobs = [CompileJob(str(i), "built", ("sh", "-c", f"sleep 3; touch {tmp_path}/{i}"), tmp_path, tmp_path / str(i))
            for i in range(6)]
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, 2)
    assert len(list(tmp_path.iterdir())) <= 2  # at most the two that were running
