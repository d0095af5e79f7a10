"""Distributed ThinLTO steps of ``klpforge build`` (``klpforge/kbuild/thinlto.py``) on a small tree that clang-19
and ld.lld-19 build during the test the way 7.3's Kbuild does (bitcode objects, ``builtin.order``, the index-only
link and per-object backends recorded in ``.cmd`` files with Kbuild's ``savedcmd_`` lines).

``a.c`` has a static ``helper`` that ``a_small`` calls; ``b.c`` calls ``a_small`` (imported and inlined, so
``helper`` is promoted to ``helper.llvm.<hash of a>``); ``c.c`` calls ``a_other`` (imported and inlined);
``d.c`` imports nothing from ``a``. The patch changes ``helper``. Needs the Clang build root (made by
``klpforge kernel prepare --toolchain clang``); skips without it unless ``KLPFORGE_REQUIRE_KERNEL=1``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.clang import RootRunner
from klpforge.kbuild.restore import tree_manifest
from klpforge.kbuild.testkernel import require_kernel
from klpforge.kbuild.thinlto import backend, relink_index, stable_llvm_names

FLAGS = "-O2 -pg -mfentry -fsanitize=kcfi"
SOURCES = {
    "a.c": ("static int counter;\n"
            "static __attribute__((noinline)) int helper(int x) { counter++; return x * 3 + counter; }\n"
            "int a_small(int x) { return helper(x); }\n"
            "int a_other(int x) { return x - 7; }\n"),
    "b.c": "int a_small(int x);\nint b_api(int x) { return a_small(x) + 2; }\n",
    "c.c": "int a_other(int x);\nint c_api(int x) { return a_other(x) * 5; }\n",
    "d.c": "int d_api(int x) { return x ^ 0x55; }\n",
}


@pytest.fixture(scope="module")
def runner() -> RootRunner:
    from klpforge.distro.roots import clang_root
    from klpforge.kbuild.prepare import cache_root

    if not (cache_root() / "roots/trixie-clang-amd64.json").is_file() and not require_kernel():
        pytest.skip("no Clang build root (made by `klpforge kernel prepare --toolchain clang`, ~2.5 min)")
    return RootRunner(clang_root(), (Path("/tmp").resolve(),))


def _ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stderr


@pytest.fixture()
def tree(runner: RootRunner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = tmp_path_factory.mktemp("build", numbered=True)
    for name, text in SOURCES.items():
        (b / name).write_text(text)
        _ok(runner(f"clang-19 {FLAGS} -flto=thin -fsplit-lto-unit -c -o {name[:-2]}.o {name}", b))
    (b / "builtin.order").write_text("".join(f"{n[:-2]}.o\n" for n in SOURCES))
    idx = "ld.lld-19 -m elf_x86_64 -r --thinlto-index-only=vmlinux.thinlto-index @builtin.order"
    (b / ".vmlinux.thinlto-index.cmd").write_text(f"savedcmd_vmlinux.thinlto-index := {idx}\n")
    _ok(runner(idx, b))
    for n in SOURCES:
        o = n[:-2]
        cmd = (f"clang-19 {FLAGS} -x ir -fno-lto -Wno-unused-command-line-argument -fthinlto-index={o}.o.thinlto.bc "
               f"-c -o {o}.thinlto-native.o {o}.o")
        (b / f".{o}.thinlto-native.o.cmd").write_text(f"savedcmd_{o}.thinlto-native.o := {cmd}\n")
        _ok(runner(cmd, b))
    _ok(runner("ld.lld-19 -r -o vmlinux " + " ".join(f"{n[:-2]}.thinlto-native.o" for n in SOURCES), b))
    return b


def _diff(orig: Path, patched: Path, vmlinux: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", "diff", str(orig), str(patched), "-o", str(out),
                           "--symtab", str(vmlinux), "--target", "vmlinux"], capture_output=True, text=True)


def test_only_importers_redone_and_names_kept(runner: RootRunner, tree: Path, tmp_path: Path) -> None:
    before = tree_manifest(tree)
    patched_src = tmp_path / "a.c"
    patched_src.write_text(SOURCES["a.c"].replace("x * 3 + counter", "x * 4 + counter"))
    _ok(runner(f"clang-19 {FLAGS} -flto=thin -fsplit-lto-unit -c -o {tmp_path}/a.o {patched_src}", tree))
    plan = relink_index(tree, tmp_path / "view", {"a.o": tmp_path / "a.o"}, runner)
    assert plan.redo == ["a.o", "b.o", "c.o"], plan.why          # d.o imports nothing from a.o
    assert plan.why["b.o"].startswith("its ThinLTO index changed")
    # the original backend (no extra flags) is byte for byte the code the "kernel" was linked from
    exact_o, _ = backend(tree, plan, tmp_path / "exact", "", 1, runner)
    for obj in plan.redo:
        assert exact_o[obj].read_bytes() == (tree / obj.replace(".o", ".thinlto-native.o")).read_bytes()
    orig, new = backend(tree, plan, tmp_path / "native", "-ffunction-sections -fdata-sections", 2, runner)
    promoted = [ln.split()[-1] for ln in subprocess.run(["nm", str(orig["a.o"])], capture_output=True,
                                                          text=True).stdout.splitlines() if ".llvm." in ln]
    assert len(promoted) == 1 and promoted[0].startswith("helper.llvm.")
    ren = stable_llvm_names(orig["b.o"], new["b.o"])  # b's call to the promoted helper: renamed back
    assert list(ren.values()) == promoted and list(ren)[0] != promoted[0]
    assert stable_llvm_names(orig["a.o"], new["a.o"]) == {list(ren)[0]: promoted[0]}
    a = _diff(orig["a.o"], new["a.o"], tree / "vmlinux", tmp_path / "a.diff.o")
    assert a.returncode == 0 and f"replaces: {promoted[0]}" in a.stdout, a.stdout + a.stderr
    for obj in ("b.o", "c.o"):  # inlined a_small / a_other are unchanged: no change, not a false positive
        r = _diff(orig[obj], new[obj], tree / "vmlinux", tmp_path / f"{obj}.diff.o")
        assert r.returncode == 3 and "no change found" in r.stderr, r.stdout + r.stderr
    after = tree_manifest(tree, reuse=before)
    assert sorted(k for k in before.keys() | after.keys() if (before.get(k) or ())[:3] != (after.get(k) or ())[:3]) \
        == []


def test_cross_file_inlining_change_redoes_the_importer(runner: RootRunner, tree: Path, tmp_path: Path) -> None:
    """a_other is inlined into c_api: changing it changes c's native code too, which the diff then finds."""
    patched_src = tmp_path / "a.c"
    patched_src.write_text(SOURCES["a.c"].replace("return x - 7;", "return x - 9;"))
    _ok(runner(f"clang-19 {FLAGS} -flto=thin -fsplit-lto-unit -c -o {tmp_path}/a.o {patched_src}", tree))
    plan = relink_index(tree, tmp_path / "view", {"a.o": tmp_path / "a.o"}, runner)
    assert "c.o" in plan.redo and "d.o" not in plan.redo
    orig, new = backend(tree, plan, tmp_path / "native", "-ffunction-sections -fdata-sections", 2, runner)
    for o in plan.redo:
        stable_llvm_names(orig[o], new[o])
    r = _diff(orig["c.o"], new["c.o"], tree / "vmlinux", tmp_path / "c.diff.o")
    assert r.returncode == 0 and "c_api" in r.stdout, r.stdout + r.stderr
