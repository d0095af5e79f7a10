"""Unit tests of the kernel-tree side that need no prepared kernel (real files, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from klpforge.errors import InputError, UnsafeChange
from klpforge.kbuild.module import KlpFunc, KlpTarget, kbuild_file, module_source, sanitize_module_name
from klpforge.kbuild.patchfile import SourcePatch, refusal_reason
from klpforge.kbuild.prepare import check_config, fragment_lines, fragment_text, merge_fragment
from klpforge.kbuild.restore import TreeGuard, journal_dir, recover_tree, tree_checksum
from klpforge.kbuild.tree import CompileCommand

PATCHES = Path(__file__).parent / "kernel_patches"


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("KLPFORGE_CACHE", str(c))
    return c


def _tree(root: Path) -> Path:
    (root / "fs/proc").mkdir(parents=True)
    (root / "fs/proc/cmdline.c").write_text("int a;\nint b;\nint c;\n")
    (root / "fs/proc/other.c").write_text("x\n")
    return root


PATCH = textwrap.dedent("""\
    --- a/fs/proc/cmdline.c
    +++ b/fs/proc/cmdline.c
    @@ -1,3 +1,3 @@
     int a;
    -int b;
    +int b2;
     int c;
    --- /dev/null
    +++ b/fs/proc/new.c
    @@ -0,0 +1 @@
    +int n;
    """)


def test_fragment_is_complete_and_mergeable() -> None:
    wanted = fragment_lines(fragment_text("6.1"))
    assert wanted["CONFIG_LIVEPATCH"] == "CONFIG_LIVEPATCH=y"
    assert wanted["CONFIG_MODVERSIONS"] == "# CONFIG_MODVERSIONS is not set"
    merged = merge_fragment("CONFIG_64BIT=n\n# CONFIG_LIVEPATCH is not set\nCONFIG_X=y\n", wanted)
    assert check_config(merged, wanted) == []
    assert "CONFIG_X=y" in merged
    assert check_config("CONFIG_X=y\n", {"CONFIG_LIVEPATCH": "CONFIG_LIVEPATCH=y"}) == ["CONFIG_LIVEPATCH=y"]


def test_refusal_reasons() -> None:
    assert refusal_reason("arch/x86/entry/entry_64.S") == "assembly sources (.S) are not live-patchable"
    assert "lib/" in (refusal_reason("lib/string.c") or "")
    assert refusal_reason("arch/x86/entry/vdso/vma.c") is not None
    assert refusal_reason("fs/proc/cmdline.c") is None


def test_patch_parse_and_refuse(tmp_path: Path) -> None:
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    sp = SourcePatch.parse(p)
    assert sp.files == ("fs/proc/cmdline.c", "fs/proc/new.c")
    assert sp.created == ("fs/proc/new.c",)
    bad = tmp_path / "bad.patch"
    bad.write_text(PATCH.replace("fs/proc/cmdline.c", "arch/x86/entry/entry_64.S"))
    with pytest.raises(UnsafeChange, match=r"arch/x86/entry/entry_64.S: assembly sources \(.S\)"):
        SourcePatch.parse(bad).refuse_unpatchable()
    empty = tmp_path / "empty.patch"
    empty.write_text("hello\n")
    with pytest.raises(InputError, match="no file changes found"):
        SourcePatch.parse(empty)


def test_patch_that_does_not_apply(tmp_path: Path) -> None:
    root = _tree(tmp_path / "src")
    (root / "fs/proc/cmdline.c").write_text("int a;\nint zz;\nint c;\n")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    before = tree_checksum(root)
    with pytest.raises(InputError, match="x.patch does not apply to"):
        SourcePatch.parse(p).dry_run(root)
    assert tree_checksum(root) == before


def test_guard_restores_content_mtime_and_created_files(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path / "src")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    target = root / "fs/proc/cmdline.c"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    os.utime(target.parent, ns=(2_000_000_000, 2_000_000_000))
    before = tree_checksum(root)
    sp = SourcePatch.parse(p)
    with pytest.raises(RuntimeError, match="boom"):
        with TreeGuard(root, sp.files):
            sp.apply(root)
            assert "b2" in target.read_text() and (root / "fs/proc/new.c").is_file()
            raise RuntimeError("boom")
    assert tree_checksum(root) == before
    assert target.stat().st_mtime_ns == 1_000_000_000
    assert target.parent.stat().st_mtime_ns == 2_000_000_000  # patch(1) renamed files in there
    assert not (root / "fs/proc/new.c").exists()
    assert not journal_dir(root).exists()


def _guard_child(root: Path, patch: Path, cache: Path) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import time, sys
        from pathlib import Path
        from klpforge.kbuild.patchfile import SourcePatch
        from klpforge.kbuild.restore import TreeGuard
        sp = SourcePatch.parse(Path({str(patch)!r}))
        try:
            with TreeGuard(Path({str(root)!r}), sp.files):
                sp.apply(Path({str(root)!r}))
                print("applied", flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            sys.exit(130)
        """)
    env = dict(os.environ, KLPFORGE_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "applied"
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 143)])
def test_guard_restores_on_signal(tmp_path: Path, cache: Path, sig: int, code: int) -> None:
    root = _tree(tmp_path / "src")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    before = tree_checksum(root)
    proc = _guard_child(root, p, cache)
    assert tree_checksum(root) != before
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code
    assert tree_checksum(root) == before


def test_journal_recovers_after_sigkill(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path / "src")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    before = tree_checksum(root)
    proc = _guard_child(root, p, cache)
    proc.kill()
    proc.wait(timeout=30)
    assert tree_checksum(root) != before  # SIGKILL cannot be caught ...
    assert recover_tree(root) == ["fs/proc/cmdline.c", "fs/proc/new.c"]  # ... the journal can
    assert tree_checksum(root) == before
    assert recover_tree(root) == []


def test_redirected_command_never_writes_into_the_tree() -> None:
    cc = CompileCommand(
        "fs/proc/cmdline.o",
        "gcc -Wp,-MMD,fs/proc/.cmdline.o.d -O2 -c -o fs/proc/cmdline.o /s/fs/proc/cmdline.c   ; "
        "./tools/objtool/objtool --orc fs/proc/cmdline.o", Path("/s/fs/proc/cmdline.c"))
    cmd = cc.redirected(Path("/tmp/o/fs/proc/cmdline.o"))
    assert "-ffunction-sections -fdata-sections -c -o /tmp/o/fs/proc/cmdline.o /s/fs/proc/cmdline.c" in cmd
    assert cmd.endswith("objtool --orc /tmp/o/fs/proc/cmdline.o")
    assert "-Wp,-MMD,/tmp/o/fs/proc/.cmdline.o.d" in cmd
    assert " fs/proc/cmdline.o" not in cmd


def test_module_source_compiles_shape() -> None:
    t = KlpTarget("vmlinux", [KlpFunc("cmdline_proc_show", 0, "klpf_new")], {"pre_patch": "cb.isra.0"})
    m = KlpTarget("kobject_example", [KlpFunc("foo_show", 2, "klpf_foo")])
    src = module_source("livepatch-x", [t, m])
    assert '.old_name = "cmdline_proc_show", .new_func = klpforge_new_1, .old_sympos = 0' in src
    assert 'extern int klpforge_cb_2(struct klp_object *obj) __asm__("cb.isra.0");' in src
    assert '{ .name = NULL, .funcs = klpforge_funcs_0, .callbacks = { .pre_patch = klpforge_cb_2 } }' in src
    assert '{ .name = "kobject_example", .funcs = klpforge_funcs_1 }' in src
    assert ".replace = true" in src and 'MODULE_INFO(livepatch, "Y");' in src
    assert ".replace = false" in module_source("x", [t], replace=False)
    assert kbuild_file("lp", ["a.o"]) == "obj-m := lp.o\nlp-y := klpforge-core.o a.o\n"
    assert sanitize_module_name("a" * 80) == "a" * 55


def test_kernel_patches_are_well_formed() -> None:
    names = sorted(p.name for p in PATCHES.glob("*.patch"))
    assert len([n for n in names if not n.startswith("9")]) >= 7
    for n in names:
        sp = SourcePatch.parse(PATCHES / n)
        sp.refuse_unpatchable()
        assert all(f.endswith((".c", ".h")) for f in sp.files), n


def test_journal_is_outside_the_tree(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path / "src")
    assert not str(journal_dir(root)).startswith(str(root))
    assert str(journal_dir(root)).startswith(str(cache))
    time.sleep(0)
