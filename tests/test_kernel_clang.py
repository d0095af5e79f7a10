"""Clang 19 + distributed ThinLTO + kCFI (issue 18): the 7.3 test kernel, live patches built from the post-LTO
native objects, verified in QEMU.

The kernel is ``klpforge kernel prepare --toolchain clang --lto thin --cfi`` (cached like the 6.1 test kernel;
about 20 minutes cold, see docs/clang.md): the kernel tests run only with ``KLPFORGE_CLANG=1`` (then they fail
without the kernel), not under ``KLPFORGE_REQUIRE_KERNEL=1`` alone, so that a cold CI stays under an hour. The
toolchain tests at the top need only the Clang build root (made on demand, ~2.5 min).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from klpforge.kbuild.clang import Toolchain, check_supported, variant_for
from klpforge.kbuild.prepare import KernelLayout
from klpforge.kbuild.restore import tree_manifest
from klpforge.kbuild.testkernel import prepared_kernel, require_kernel
from klpforge.util.errors import InputError

from .test_kernel_e2e import PATCHES, klpforge

CLANG_PATCHES = Path(__file__).parent / "kernel_patches_clang"
VARIANT = "clang-thin-cfi"


# -- what the config says, and what is refused (no kernel needed) --------------------------------------------

def test_toolchain_read_from_config() -> None:
    assert Toolchain.from_config({"CONFIG_CC_IS_GCC": "y"}) == Toolchain("gcc", "none", False)
    assert Toolchain.from_config({"CONFIG_CC_IS_CLANG": "y", "CONFIG_LTO_CLANG_THIN_DIST": "y",
                                  "CONFIG_CFI": "y"}) == Toolchain("clang", "thin-dist", True)
    # 6.x spelling of kCFI
    assert Toolchain.from_config({"CONFIG_CC_IS_CLANG": "y", "CONFIG_CFI_CLANG": "y"}).cfi
    assert Toolchain.from_config({"CONFIG_CC_IS_CLANG": "y", "CONFIG_LTO_CLANG_FULL": "y"}).lto == "full"


def test_unsupported_lto_modes_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="in-process ThinLTO.*CONFIG_LTO_CLANG_THIN_DIST"):
        check_supported(Toolchain("clang", "thin", False), tmp_path / ".config")
    with pytest.raises(InputError, match="FULL optimises vmlinux as one module.*full build per patch"):
        check_supported(Toolchain("clang", "full", True), tmp_path / ".config")
    check_supported(Toolchain("clang", "thin-dist", True), tmp_path / ".config")


def test_prepare_flags() -> None:
    assert variant_for("clang", "thin", True) == VARIANT
    assert variant_for("gcc", None, False) == ""
    with pytest.raises(InputError, match="--lto and --cfi need --toolchain clang"):
        variant_for("gcc", None, True)


def test_variant_fragments_compose() -> None:
    from klpforge.kbuild.prepare import KernelLayout, fragment_lines, fragment_text

    lines = fragment_lines(fragment_text("7.3", VARIANT))
    assert lines["CONFIG_CC_IS_CLANG"] == "CONFIG_CC_IS_CLANG=y"
    assert lines["CONFIG_LTO_CLANG_THIN_DIST"] == "CONFIG_LTO_CLANG_THIN_DIST=y"
    assert lines["CONFIG_CFI"] == "CONFIG_CFI=y" and lines["CONFIG_LIVEPATCH"] == "CONFIG_LIVEPATCH=y"
    assert "CONFIG_LTO_CLANG_THIN_DIST" not in fragment_lines(fragment_text("7.3", "clang-cfi"))
    assert "CONFIG_X86_KERNEL_IBT" in fragment_lines(fragment_text("6.1", "ibt"))  # the 6.1 variant still works
    lay = KernelLayout.default("7.3", "/tmp/c", VARIANT)
    assert lay.clang and lay.src == Path("/tmp/c/kernel-7.3/linux-source-7.3")
    assert lay.build == Path(f"/tmp/c/kernel-7.3-{VARIANT}/build")
    assert lay.tarball == Path("/tmp/c/kernel-7.3/linux-source-7.3.tar.xz")  # taken from the fetched .deb


def test_prepare_cli_refusals() -> None:
    r = klpforge("kernel", "prepare", "--cfi")
    assert r.returncode == 1 and "need --toolchain clang" in r.stderr, r.stderr
    r = klpforge("kernel", "prepare", "--toolchain", "clang", "--version", "6.1")
    assert r.returncode == 1 and "the Clang test kernel is 7.3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# -- the kernel -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clang_kernel() -> KernelLayout:
    lay = prepared_kernel("7.3", VARIANT)
    if os.environ.get("KLPFORGE_CLANG") != "1":  # not under KLPFORGE_REQUIRE_KERNEL alone: ~20 min cold
        pytest.skip("the Clang kernel tests run with KLPFORGE_CLANG=1 (scripts/setup.sh --clang prepares it)")
    if lay is None:
        pytest.fail("KLPFORGE_CLANG=1 but no Clang kernel: run "
                    "`klpforge kernel prepare --toolchain clang --lto thin --cfi`")
    return lay


@pytest.fixture(scope="module")
def baseline(clang_kernel: KernelLayout) -> tuple[dict, dict]:
    return tree_manifest(clang_kernel.src), tree_manifest(clang_kernel.build)


def _build(kernel: KernelLayout, patch: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(patch), "-o", str(out),
                    "--json", str(out.with_suffix(".json")), timeout=1200)


@pytest.mark.kernel
def test_kernel_is_clang_thinlto_kcfi(clang_kernel: KernelLayout) -> None:
    cfg = (clang_kernel.build / ".config").read_text()
    for line in ("CONFIG_CC_IS_CLANG=y", "CONFIG_LTO_CLANG_THIN_DIST=y", "CONFIG_CFI=y", "CONFIG_LIVEPATCH=y"):
        assert line in cfg
    assert 'CONFIG_CC_VERSION_TEXT="Debian clang version 19.' in cfg
    native = clang_kernel.build / "fs/proc/cmdline.thinlto-native.o"
    assert native.is_file()
    # the bitcode object and the post-LTO native one: LLVM IR magic 'BC' vs ELF
    assert (clang_kernel.build / "fs/proc/cmdline.o").read_bytes()[:2] == b"BC"
    assert native.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.kernel
def test_cmdline_built_from_post_lto_code_and_verified(clang_kernel: KernelLayout, baseline: tuple[dict, dict],
                                                       tmp_path: Path) -> None:
    """The 6.1 cmdline patch on the Clang kernel: only fs/proc/cmdline's backend (and those whose ThinLTO index
    changed) run again; cmdline_proc_show is replaced with its kCFI preamble intact and /proc/cmdline shows the
    marker in QEMU, back to normal after disable. The trees are untouched."""
    ko = tmp_path / "livepatch-clang-cmdline.ko"
    r = _build(clang_kernel, PATCHES / "01-cmdline-text.patch", ko)
    assert r.returncode == 0, r.stderr
    report = json.loads(ko.with_suffix(".json").read_text())
    funcs = {f["old_name"] for o in report["objects"] for f in o["functions"]}
    assert funcs == {"cmdline_proc_show"}, report
    assert report["objects"][0]["diff_report"]["lto"]["why_rebuilt"].startswith("changed by the patch")
    assert "lto" in report["timings_s"]
    v = klpforge("verify", str(ko), "--kernel", str(clang_kernel.bzimage), "--check", "cat /proc/cmdline",
                 "--expect", "klpforge=cmdline", "--console-log", str(tmp_path / "console.log"), timeout=600)
    assert v.returncode == 0, v.stderr + (tmp_path / "console.log").read_text()[-3000:]
    console = (tmp_path / "console.log").read_text()
    assert "patching complete" in console
    assert "CFI failure" not in console
    for before, root in zip(baseline, (clang_kernel.src, clang_kernel.build), strict=True):
        after = tree_manifest(root, reuse=before)
        assert sorted(k for k in before.keys() | after.keys()
                      if (before.get(k) or ())[:3] != (after.get(k) or ())[:3])[:5] == []


@pytest.mark.kernel
def test_changed_prototype_refused_for_kcfi(clang_kernel: KernelLayout, tmp_path: Path) -> None:
    """A replaced function called through a pointer whose type changes gets another kCFI hash: refused
    (exit 2) naming the function and both hashes."""
    ko = tmp_path / "livepatch-proto.ko"
    r = _build(clang_kernel, CLANG_PATCHES / "90-refuse-kcfi-prototype.patch", ko)
    assert r.returncode == 2, r.stderr
    assert "cmdline_proc_show" in r.stderr and "kCFI type hash changes" in r.stderr, r.stderr
    assert not ko.exists()


# -- kCFI hashes read from objects the real clang-19 compiles (needs only the Clang build root) -----------------

KCFI_SRC = """
struct ops { int (*show)(void *m, void *v); };
static int show(void *m, void *v) { return m == v; }
int other(int x) { return x + 1; }
struct ops o = { .show = show };
int call(struct ops *p, void *a) { return p->show(a, a); }
"""


@pytest.fixture(scope="module")
def clang_root():  # type: ignore[no-untyped-def]
    from klpforge.distro.roots import clang_root as make_root
    from klpforge.kbuild.prepare import cache_root

    if not (cache_root() / "roots/trixie-clang-amd64.json").is_file() and not require_kernel():
        pytest.skip("no Clang build root (made by `klpforge kernel prepare --toolchain clang`, ~2.5 min)")
    return make_root()


def _clang(root, tmp_path: Path, name: str, src: str) -> Path:  # type: ignore[no-untyped-def]
    (tmp_path / f"{name}.c").write_text(src)
    out = tmp_path / f"{name}.o"
    argv = root.wrap(["clang-19", "-O2", "-pg", "-mfentry", "-fsanitize=kcfi", "-ffunction-sections", "-c", "-o",
                      str(out), str(tmp_path / f"{name}.c")], [tmp_path])
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_kcfi_prototype_change_named(clang_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from klpforge.kbuild.kcfi import cfi_hashes, check_kcfi

    a = _clang(clang_root, tmp_path, "a", KCFI_SRC)
    same = _clang(clang_root, tmp_path, "same", KCFI_SRC.replace("x + 1", "x + 2"))
    proto = _clang(clang_root, tmp_path, "proto", KCFI_SRC.replace("show(void *m, void *v) {", "show(void *m, "
                                                                  "const void *v) {").replace(
        ".show = show", ".show = (void *)show"))
    h = cfi_hashes(a)
    assert set(h) == {"show", "other", "call"} and len(set(h.values())) == 3
    assert check_kcfi("a.o", a, same) == []
    reasons = check_kcfi("a.o", a, proto)
    assert len(reasons) == 1 and reasons[0].startswith(f"a.o: show: its kCFI type hash changes from {h['show']:#010x}")


def test_kcfi_new_preamble_of_unreplaced_function(clang_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A static function first taken by address in the patch: the running copy has no preamble."""
    from klpforge.kbuild.kcfi import check_kcfi

    src = ("static __attribute__((noinline)) int helper(int x) { return x * 3; }\n"
           "int use(int x) { return helper(x); }\n")
    a = _clang(clang_root, tmp_path, "a", src)
    b = _clang(clang_root, tmp_path, "b", src + "int (*p)(int) = helper;\n")
    reasons = check_kcfi("h.o", a, b)
    assert reasons == ["h.o: helper is taken by address after the patch but the running kernel's copy has no kCFI "
                       "preamble (it never was): an indirect call to it would trap"]


def test_kcfi_preamble_and_traps_travel_with_the_function(clang_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The ud2 of a changed function's indirect-call check stays listed in .kcfi_traps (kernel/cfi.c
    is_cfi_trap: otherwise a CFI failure is an unexplained invalid-opcode oops)."""
    src = "int call(int (*f)(int), int x) { return f(x) + 1; }\nint other(int x) { return x; }\n"
    a = _clang(clang_root, tmp_path, "a", src)
    b = _clang(clang_root, tmp_path, "b", src.replace("+ 1", "+ 2"))
    vml = tmp_path / "vml"
    r = subprocess.run(clang_root.wrap(["ld.lld-19", "-r", "-o", str(vml), str(a)], [tmp_path]), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "d.o"
    r = klpforge("diff", str(a), str(b), "-o", str(out), "--symtab", str(vml), "--target", "vmlinux")
    assert r.returncode == 0, r.stderr
    rel = subprocess.run(["readelf", "-rW", str(out)], capture_output=True, text=True).stdout
    section = rel.split("'.rela.kcfi_traps'")[1].split("Relocation section")[0]
    assert "R_X86_64_PC32" in section and " call + " in section
    from klpforge.kbuild.kcfi import cfi_hashes

    # the preamble travels with its function, right before it, with the original's hash
    assert cfi_hashes(out)["call"] == cfi_hashes(a)["call"]


# -- the other kernel patches on the Clang kernel (each built and verified in QEMU) -------------------

def _replaced(ko: Path) -> dict[str, set[str]]:
    """``{target: {replaced function}}`` from the build's --json report."""
    report = json.loads(ko.with_suffix(".json").read_text())
    out: dict[str, set[str]] = {}
    for o in report["objects"]:
        out.setdefault(o["target"], set()).update(f["old_name"] for f in o["functions"])
    return out


def _verify(kernel: KernelLayout, ko: Path, tmp_path: Path, *args: str) -> str:
    """``klpforge verify`` of ``ko`` with ``args``; asserts success and no kCFI trap; returns the console."""
    log = tmp_path / "console.log"
    v = klpforge("verify", str(ko), "--kernel", str(kernel.bzimage), *args, "--console-log", str(log),
                 timeout=600)
    console = log.read_text() if log.is_file() else ""
    assert v.returncode == 0, v.stderr + console[-3000:]
    assert "patching complete" in console and "unpatching complete" in console
    assert "CFI failure" not in console
    return console


@pytest.mark.kernel
def test_function_pointer_keeps_kcfi_hash(clang_kernel: KernelLayout, tmp_path: Path) -> None:
    """03-meminfo: meminfo_proc_show is only ever called through seq_file's ``op->show`` pointer (a kCFI
    checked indirect call) and has show_val_kb inlined. Its copy in the live patch carries a ``__cfi_``
    preamble with the running function's hash, and reading /proc/meminfo in the guest (the indirect call,
    then the ftrace redirection) succeeds without a CFI failure; after disable the original answers again."""
    from klpforge.kbuild.kcfi import cfi_hashes

    ko = tmp_path / "livepatch-clang-meminfo.ko"
    r = _build(clang_kernel, PATCHES / "03-meminfo-inlined-static.patch", ko)
    assert r.returncode == 0, r.stderr
    assert _replaced(ko) == {"vmlinux": {"meminfo_proc_show"}}
    running = cfi_hashes(clang_kernel.build / "fs/proc/meminfo.thinlto-native.o")["meminfo_proc_show"]
    assert cfi_hashes(ko)["meminfo_proc_show"] == running
    _verify(clang_kernel, ko, tmp_path, "--check", "grep MemTotal /proc/meminfo", "--expect", " KiB",
            "--after-check", "grep MemTotal /proc/meminfo", "--after-expect", " kB")


@pytest.mark.kernel
def test_thinlto_cross_file_inlining(clang_kernel: KernelLayout, tmp_path: Path) -> None:
    """clang/10: nr_running (kernel/sched/core.c) is imported by ThinLTO into fs/proc/loadavg.o and
    fs/proc/stat.o and inlined there: those objects' backends run again (their index changed), their
    callers are replaced too, and the report names each importing object and why."""
    ko = tmp_path / "livepatch-clang-nr.ko"
    r = _build(clang_kernel, CLANG_PATCHES / "10-nr-running-thinlto-inlined.patch", ko)
    assert r.returncode == 0, r.stderr
    assert _replaced(ko) == {"vmlinux": {"nr_running", "loadavg_proc_show", "show_stat"}}
    report = json.loads(ko.with_suffix(".json").read_text())
    why = {o["diff_report"]["lto"]["object"]: o["diff_report"]["lto"]["why_rebuilt"] for o in report["objects"]}
    assert why["kernel/sched/core.o"].startswith("changed by the patch")
    for importer in ("fs/proc/loadavg.o", "fs/proc/stat.o"):
        assert why[importer] == "its ThinLTO index changed: it imports from kernel/sched/core.o", why
    count = 'n=$(cut -d" " -f4 /proc/loadavg); n=${n%/*}; '
    _verify(clang_kernel, ko, tmp_path,
            "--check", count + '[ "$n" -ge 1000 ] && echo klpforge-nr-high; grep procs_running /proc/stat',
            "--expect", "klpforge-nr-high",
            "--after-check", count + '[ "$n" -lt 1000 ] && echo klpforge-nr-back', "--after-expect",
            "klpforge-nr-back")


@pytest.mark.kernel
def test_static_local_is_the_running_kernels(clang_kernel: KernelLayout, tmp_path: Path) -> None:
    """clang/11: drop_caches_sysctl_handler's ``static int stfu`` (Clang: ``<function>.<name>``) is reached
    through klp relocations to the kernel's variable, never copied: what the patched handler sets silences
    the original after the patch is disabled."""
    ko = tmp_path / "livepatch-clang-drop.ko"
    r = _build(clang_kernel, CLANG_PATCHES / "11-drop-caches-static-local.patch", ko)
    assert r.returncode == 0, r.stderr
    assert _replaced(ko) == {"vmlinux": {"drop_caches_sysctl_handler"}}
    rel = subprocess.run(["readelf", "-rsW", str(ko)], capture_output=True, text=True, check=True).stdout
    assert ".klp.sym.vmlinux.drop_caches_sysctl_handler.stfu,0" in rel
    assert not [ln for ln in rel.splitlines() if ln.rstrip().endswith(" drop_caches_sysctl_handler.stfu")]
    _verify(clang_kernel, ko, tmp_path,
            "--check", "for v in 1 4 1; do echo $v > /proc/sys/vm/drop_caches; done; "
                       'echo klpforge-drop-count=$(dmesg | grep -c "klpforge-drop:")',
            "--expect", "klpforge-drop-count=2",
            "--after-check", 'echo 1 > /proc/sys/vm/drop_caches; echo after=$(dmesg | grep -c "drop_caches: 1")',
            "--after-expect", "after=0")


@pytest.mark.kernel
def test_module_function(clang_kernel: KernelLayout, tmp_path: Path) -> None:
    """05-kobject: foo_show of samples/kobject/kobject-example.ko. On this kernel a module object is
    compiled to bitcode and LTO'd on its own by the ``ld.lld -r`` of its recorded command (then objtool):
    klpforge runs that whole command in the Clang root. The module is loaded after the live patch
    (klp_module_coming applies it) and shows the marker."""
    ko = tmp_path / "livepatch-clang-kobj.ko"
    r = _build(clang_kernel, PATCHES / "05-kobject-module-function.patch", ko)
    assert r.returncode == 0, r.stderr
    assert _replaced(ko) == {"kobject_example": {"foo_show"}}
    kobj = clang_kernel.build / "samples/kobject/kobject-example.ko"
    _verify(clang_kernel, ko, tmp_path, "--file", str(kobj),
            "--check", "insmod /lib/klp/kobject-example.ko && cat /sys/kernel/kobject_example/foo",
            "--expect", "0 klpforge")
