"""Unit tests of the kernel-tree side that need no prepared kernel (real files, real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from klpforge.kbuild.module import KlpFunc, KlpTarget, kbuild_file, module_source, sanitize_module_name
from klpforge.kbuild.overlay import Overlay, reads_from_tree, rewrite_command
from klpforge.kbuild.patchfile import SourcePatch, refusal_reason
from klpforge.kbuild.prepare import check_config, fragment_lines, fragment_text, merge_fragment
from klpforge.kbuild.restore import check_old_journal, journal_dir, tree_manifest
from klpforge.kbuild.tree import CompileCommand
from klpforge.util.errors import InputError, UnsafeChange

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


def _git_tree(root: Path) -> Path:
    """A small git repository: a source file, a script, a header."""
    _tree(root)
    (root / "include").mkdir()
    (root / "include/h.h").write_text("#define V 1\n")
    (root / "fs/proc/run.sh").write_text("echo hi\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


def test_git_extended_headers_are_read_and_carried_out_in_the_copy(tmp_path: Path) -> None:
    """A git patch renaming a file, changing a mode and creating an empty file: parsed, and applied only in
    klpforge's private copy -- the tree keeps every byte, mode and mtime (directories too)."""
    root = _git_tree(tmp_path / "src")
    subprocess.run(["git", "mv", "fs/proc/other.c", "fs/proc/moved.c"], cwd=root, check=True)
    (root / "fs/proc/run.sh").chmod(0o755)
    (root / "fs/proc/empty.txt").touch()
    (root / "include/h.h").write_text("#define V 2\n")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    diff = subprocess.run(["git", "diff", "--cached", "-M"], cwd=root, check=True, capture_output=True,
                          text=True).stdout
    subprocess.run(["git", "reset", "-q", "--hard"], cwd=root, check=True)
    assert not (root / "fs/proc/empty.txt").exists()
    p = tmp_path / "git.patch"
    p.write_text(diff)
    sp = SourcePatch.parse(p)
    assert sp.renamed == (("fs/proc/other.c", "fs/proc/moved.c"),)
    assert sp.mode_changed == ("fs/proc/run.sh",)
    assert sp.created == ("fs/proc/empty.txt",)
    assert set(sp.files) == {"fs/proc/other.c", "fs/proc/moved.c", "fs/proc/run.sh", "fs/proc/empty.txt",
                             "include/h.h"}
    before = tree_manifest(root)
    ov = Overlay(root, tmp_path / "ov", sp.files)
    ov.snapshot(sp)
    assert tree_manifest(root) == before
    assert (ov.new / "fs/proc/moved.c").read_text() == "x\n" and not (ov.new / "fs/proc/other.c").exists()
    assert (ov.new / "fs/proc/run.sh").stat().st_mode & 0o111
    assert (ov.new / "fs/proc/empty.txt").read_bytes() == b""
    assert (ov.new / "include/h.h").read_text() == "#define V 2\n"
    assert set(ov.changed()) == set(sp.files)
    ov.build_view()
    ov.show("new")
    assert tree_manifest(root) == before
    assert (ov.view / "fs/proc/cmdline.c").is_symlink() and (ov.view / "include/h.h").is_file()
    assert not (ov.view / "fs/proc/other.c").exists()


def test_patch_that_does_not_apply_in_the_copy(tmp_path: Path) -> None:
    root = _tree(tmp_path / "src")
    (root / "fs/proc/cmdline.c").write_text("int a;\nint zz;\nint c;\n")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    before = tree_manifest(root)
    with pytest.raises(InputError, match=f"x.patch does not apply to {root}: "):
        Overlay(root, tmp_path / "ov", SourcePatch.parse(p).files).snapshot(SourcePatch.parse(p))
    assert tree_manifest(root) == before


KBUILD_LIKE = ("gcc -Wp,-MMD,{d}/.a.o.d -nostdinc -I{src}/include -I ./include -include {src}/include/h.h "
               "-fmacro-prefix-map={src}/= -O2 -I {src}/dir -c -o {out} {src}/dir/a.c")


def test_view_compiles_the_copies_with_untouched_neighbours_and_real_names(tmp_path: Path, gcc: str) -> None:
    """Compile through the view as Kbuild would (O= build, absolute source paths): the patched header
    and .c are the copies, an untouched quote-included neighbour is found next to the copied .c,
    ``__FILE__`` names the real tree as the original build does, and the tree stays untouched."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "include").mkdir()
    (src / "include/h.h").write_text("#define V 1\n")
    (src / "dir/local.h").write_text("#define L 7\n")
    (src / "dir/a.c").write_text('#include "local.h"\nconst char *f(void) { return __FILE__; }\n'
                                 "int v(void) { return V * 100 + L; }\n")
    build = tmp_path / "build"
    (build / "include").mkdir(parents=True)
    p = tmp_path / "h.patch"
    p.write_text("--- a/include/h.h\n+++ b/include/h.h\n@@ -1 +1 @@\n-#define V 1\n+#define V 3\n"
                 "--- a/dir/a.c\n+++ b/dir/a.c\n@@ -1,3 +1,3 @@\n #include \"local.h\"\n"
                 " const char *f(void) { return __FILE__; }\n-int v(void) { return V * 100 + L; }\n"
                 "+int v(void) { return V * 100 + L + 1; }\n")
    sp = SourcePatch.parse(p)
    before = tree_manifest(src)
    ov = Overlay(src, tmp_path / "ov", sp.files)
    ov.snapshot(sp)
    ov.build_view()
    objs = {}
    for which in ("orig", "new"):
        ov.show(which)
        d = tmp_path / which
        d.mkdir()
        out = d / "a.o"
        cmd = rewrite_command(KBUILD_LIKE.format(d=d, src=src.resolve(), out=out), src.resolve(),
                              build.resolve(), ov.view)
        assert str(src.resolve()) + "/dir/a.c" not in cmd
        r = subprocess.run(cmd.replace(f"-c -o {out}", f"-S -o {d / 'a.s'}"), shell=True, cwd=build,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        subprocess.run(cmd, shell=True, cwd=build, check=True)
        assert reads_from_tree(d / ".a.o.d", build, src.resolve(), ov.paths) == []
        objs[which] = (d / "a.s").read_text()
    assert '.string\t"dir/a.c"' in objs["orig"] and '.string\t"dir/a.c"' in objs["new"]
    assert "$107" in objs["orig"] and "$308" in objs["new"]  # V*100+L: the copies, both of them
    assert tree_manifest(src) == before


def test_reads_from_tree_names_a_touched_file_read_from_the_tree(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    dep = tmp_path / ".a.o.d"
    dep.write_text(f"a.o: /v/fs/proc/cmdline.c \\\n {src}/fs/proc/../proc/cmdline.c \\\n {src}/fs/proc/other.c\n")
    assert reads_from_tree(dep, tmp_path, src, ["fs/proc/cmdline.c"]) == [f"{src}/fs/proc/../proc/cmdline.c"]


def test_rewrite_command_in_tree_and_srctree_dotdot() -> None:
    # in-tree: relative paths already point into the view (the cwd); absolute tree paths are rewritten
    cmd = rewrite_command("gcc -I./include -c -o /t/a.o fs/a.c", Path("/s"), Path("/s"), Path("/v"))
    assert cmd.startswith("gcc -I./include -c -o /t/a.o fs/a.c -fdebug-prefix-map=/v=/s")
    # O=/s/build: Linux 6.1 sets srctree to ".." and the source is relative to the build dir
    cmd = rewrite_command("gcc -I../include -I./include -fmacro-prefix-map=../= -c -o /t/a.o ../fs/a.c ; "
                          "./tools/objtool/objtool /t/a.o", Path("/s"), Path("/s/build"), Path("/v"))
    assert "-I/v/include -I./include" in cmd and " /v/fs/a.c " in cmd
    assert "-fmacro-prefix-map=/v/= -fdebug-prefix-map=/v=/s ; ./tools/objtool/objtool /t/a.o" in cmd


def _old_journal(root: Path, cache: Path, content: bytes) -> Path:
    """The journal an older klpforge left after a SIGKILL (its on-disk format)."""
    j = journal_dir(root)
    j.mkdir(parents=True)
    (j / "0.orig").write_bytes(content)
    (j / "manifest.json").write_text(json.dumps({"src": str(root), "files": [
        {"path": "fs/proc/cmdline.c", "existed": True, "mode": 0o644, "atime_ns": 0, "mtime_ns": 0},
        {"path": "fs/proc/new.c", "existed": False, "made_dirs": []}], "dirs": {}}))
    return j


def test_old_journal_never_overwrites_the_tree(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path / "src")
    j = _old_journal(root, cache, b"int a;\nint b;\nint c;\n")
    (root / "fs/proc/cmdline.c").write_text("int a;\nint users_edit;\nint c;\n")  # edited after the kill
    before = tree_manifest(root)
    with pytest.raises(InputError, match=r"these files differ from the originals it saved in .*: "
                                         r"fs/proc/cmdline.c; check them"):
        check_old_journal(root)
    assert tree_manifest(root) == before and j.is_dir()
    (root / "fs/proc/cmdline.c").write_text("int a;\nint b;\nint c;\n")  # the user put it back
    check_old_journal(root)
    assert not j.exists()
    check_old_journal(root)  # nothing left: no-op


def test_children_end_with_klpforge_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM while a child (a shell with its own child) runs: exit 143, one line, both processes gone."""
    code = textwrap.dedent("""
        import sys
        from klpforge.util.proc import Terminated, install_signal_handlers, run
        install_signal_handlers()
        try:
            run("sleep 300 & echo $! > {pidf}; wait", shell=True)
        except Terminated as e:
            print(e, file=sys.stderr)
            sys.exit(e.exit_code)
        """).format(pidf=tmp_path / "pid")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int((tmp_path / "pid").read_text())
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err == "terminated by SIGTERM\n"
    deadline = time.monotonic() + 10
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


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
