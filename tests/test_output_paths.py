"""Output and input paths are checked before any work (issue 8, items 7, 8 and 12): an output that is an
input or another output, or that cannot be written, is refused with one line, and nothing is written or
changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import KCFLAGS

SRC = "int f(int x)\n{\n\treturn x + 1;\n}\n\nint g(int x)\n{\n\treturn x * 2;\n}\n"


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, "-m", "klpforge", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=cwd, env=env)


def one_line(r: subprocess.CompletedProcess[str], needle: str, code: int = 1) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def objs(cc) -> tuple[Path, Path]:
    return cc(SRC, "a"), cc(SRC.replace("x + 1", "x + 2"), "b")


@pytest.mark.parametrize("which", ["orig", "patched", "symtab"])
def test_diff_output_equal_to_an_input(objs: tuple[Path, Path], tmp_path: Path, which: str) -> None:
    a, b = objs
    st = tmp_path / "symtab.o"
    st.write_bytes(a.read_bytes())
    target = {"orig": a, "patched": b, "symtab": st}[which]
    before = digest(a, b, st)
    label = {"orig": "ORIG", "patched": "PATCHED", "symtab": "--symtab"}[which]
    one_line(run("diff", a, b, "-o", target, "--symtab", st), f"would overwrite the input {label}")
    assert digest(a, b, st) == before


def test_diff_output_is_an_input_by_another_name(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    hard, soft = tmp_path / "hard.o", tmp_path / "soft.o"
    os.link(b, hard)
    soft.symlink_to(b)
    before = digest(a, b)
    for alias in (hard, soft, Path(os.path.relpath(b, tmp_path))):
        one_line(run("diff", a, b, "-o", alias, "--symtab", a, cwd=tmp_path), "would overwrite the input PATCHED")
    assert digest(a, b) == before


def test_diff_output_equal_to_json(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    out = tmp_path / "x"
    one_line(run("diff", a, b, "-o", out, "--json", out, "--symtab", a), "are the same file")
    assert not out.exists()


@pytest.mark.parametrize("opt", ["-o", "--json"])
def test_diff_output_in_missing_directory(objs: tuple[Path, Path], tmp_path: Path, opt: str) -> None:
    a, b = objs
    bad = tmp_path / "nodir" / "x"
    args = ["-o", tmp_path / "lp.o", "--json", tmp_path / "r.json"]
    args[args.index(opt) + 1] = bad
    one_line(run("diff", a, b, *args, "--symtab", a), f"{opt} {bad}: directory {bad.parent} does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_diff_output_is_a_directory(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    one_line(run("diff", a, b, "-o", tmp_path, "--symtab", a), f"-o {tmp_path}: is a directory")


def test_diff_output_in_unwritable_directory(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    if os.geteuid() == 0:
        target = Path("/proc/klpforge-lp.o")  # root may write anywhere except where the kernel says no
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "lp.o"
    one_line(run("diff", a, b, "-o", target, "--symtab", a), f"-o {target}: cannot write in {target.parent}")
    assert not target.exists()


def test_diff_missing_impact_dumps_writes_nothing(objs: tuple[Path, Path], tmp_path: Path) -> None:
    # issue 8 item 8: the missing --impact input used to be found after -o was written
    a, b = objs
    out = tmp_path / "lp.o"
    one_line(run("diff", a, b, "-o", out, "--json", tmp_path / "r.json", "--symtab", a, "--impact",
                 tmp_path / "nonexistent"), "--impact")
    assert not out.exists() and not (tmp_path / "r.json").exists()
    out.write_bytes(b"old")  # an existing output stays as it was
    one_line(run("diff", a, b, "-o", out, "--symtab", a, "--impact", tmp_path / "nonexistent"),
             "no such file or directory")
    assert out.read_bytes() == b"old"


def test_diff_missing_symvers(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    one_line(run("diff", a, b, "-o", tmp_path / "lp.o", "--symtab", a, "--symvers", tmp_path / "Module.symvers"),
             "--symvers")
    assert not (tmp_path / "lp.o").exists()


def _patch(tmp_path: Path) -> Path:
    p = tmp_path / "fix.patch"
    p.write_text("--- a/t.c\n+++ b/t.c\n@@ -1,4 +1,4 @@\n int f(int x)\n {\n-\treturn x + 1;\n+\treturn x + 2;\n }\n")
    return p


def test_build_output_equal_to_patch_or_json(tmp_path: Path) -> None:
    patch = _patch(tmp_path)
    before = digest(patch)
    one_line(run("build", "-s", tmp_path, patch, "-o", patch), "would overwrite the input patch")
    one_line(run("build", "-s", tmp_path, patch, "-o", tmp_path / "x.ko", "--json", tmp_path / "x.ko"),
             "are the same file")
    assert digest(patch) == before and not (tmp_path / "x.ko").exists()


def test_build_output_in_missing_directory(tmp_path: Path) -> None:
    patch = _patch(tmp_path)
    bad = tmp_path / "no" / "lp.ko"
    one_line(run("build", "-s", tmp_path, patch, "-o", bad), f"-o {bad}: directory {bad.parent} does not exist")
    one_line(run("build", "-s", tmp_path, patch, "--json", tmp_path / "no" / "r.json"), "does not exist")
    one_line(run("build", "-s", tmp_path / "nosrc", patch), "-s")


def test_build_default_output_is_checked(tmp_path: Path) -> None:
    # without -o the module is livepatch-<patch>.ko in the current directory; a directory there is refused
    patch = _patch(tmp_path)
    (tmp_path / "livepatch-fix.ko").mkdir()
    one_line(run("build", "-s", tmp_path, patch, cwd=tmp_path), "livepatch-fix.ko: is a directory")


def test_verify_console_log_checks(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = objs
    before = digest(a)
    one_line(run("verify", a, "--kernel", b, "--check", "true", "--console-log", a),
             "--console-log", )
    assert digest(a) == before
    one_line(run("verify", a, "--kernel", b, "--check", "true", "--console-log", tmp_path / "no" / "c.log"),
             "does not exist")
    one_line(run("verify", a, "--kernel", tmp_path / "bzImage", "--check", "true"), "--kernel")


@pytest.fixture
def dumps(gcc: str, tmp_path: Path) -> Path:
    d = tmp_path / "build"
    d.mkdir()
    (d / "t.c").write_text(SRC)
    subprocess.run([gcc, *KCFLAGS, "-fdump-ipa-clones", "-c", "t.c", "-o", "t.o"], cwd=d, check=True)
    return d


def test_impact_output_checks(dumps: Path, tmp_path: Path) -> None:
    one_line(run("impact", "--dumps", dumps, "--no-cache", "f", "--svg", tmp_path / "no" / "g.svg"),
             "--svg")
    one_line(run("impact", "--dumps", dumps, "--no-cache", "f", "--dot", tmp_path), "is a directory")
    one_line(run("impact", "--dumps", dumps, "--no-cache", "f", "--dot", dumps), "would overwrite the input --dumps")
    before = digest(dumps / "t.o")
    one_line(run("impact", "--dumps", dumps, "--no-cache", "f", "--dot", dumps / "t.o"),
             "would overwrite a file read from the input --dumps")
    assert digest(dumps / "t.o") == before
    r = run("impact", "--dumps", dumps, "--no-cache", "f", "--dot", dumps / "impact.dot")  # a new file there is fine
    assert r.returncode == 0 and "digraph" in (dumps / "impact.dot").read_text()
    one_line(run("impact", "--dumps", dumps, "--no-cache", "f", "--objects", tmp_path / "nonexistent"),
             f"--objects {tmp_path / 'nonexistent'}: no such file or directory")


def test_impact_patch_matching_source(dumps: Path, tmp_path: Path) -> None:
    p = tmp_path / "fix.patch"
    # the right patch, its hunk header off by 4 lines (GNU patch applies it at an offset): g, found where it is
    p.write_text("--- a/t.c\n+++ b/t.c\n@@ -2,4 +2,4 @@\n int g(int x)\n {\n-\treturn x * 2;\n+\treturn x * 3;\n }\n")
    r = run("impact", "--dumps", dumps, "--no-cache", "--patch", p, "--source", dumps)
    assert r.returncode == 0, r.stderr
    assert "g" in r.stdout and "t.c:f" not in r.stdout


def test_impact_patch_not_matching_source(dumps: Path, tmp_path: Path) -> None:
    p = tmp_path / "fix.patch"
    p.write_text("--- a/t.c\n+++ b/t.c\n@@ -1,4 +1,4 @@\n int f(int x)\n {\n-\treturn x + 7;\n+\treturn x + 2;\n }\n")
    line = one_line(run("impact", "--dumps", dumps, "--no-cache", "--patch", p, "--source", dumps),
                    "does not match")
    assert f"{p}: hunk @@ -1,4 @@ of t.c" in line and str(dumps / "t.c") in line
    q = tmp_path / "other.patch"
    q.write_text("--- a/u.c\n+++ b/u.c\n@@ -1,1 +1,1 @@\n-int x;\n+int y;\n")
    one_line(run("impact", "--dumps", dumps, "--no-cache", "--patch", q, "--source", dumps),
             f"u.c is not in --source {dumps}")


def test_diff_imports_only_what_it_uses(tmp_path: Path) -> None:
    # issue 9: a process per object pair pays for every import; `diff -q` needs no rich, pyelftools,
    # tree-sitter, graphviz, nor the build/verify/impact packages
    peer = Path(__file__).resolve().parent.parent.parent / "shared" / "peer-objs" / "x86_64"
    if not (peer / "cold-add2.ORIG.o").exists():
        pytest.skip("peer objects not present")
    a, b = peer / "cold-add2.ORIG.o", peer / "cold-add2.PATCHED.o"
    code = ("import sys\nfrom klpforge.cli import main\n"
            f"rc = main(['diff', {str(a)!r}, {str(b)!r}, '-o', {str(tmp_path / 'lp.o')!r}, '--symtab', {str(a)!r}, "
            "'-q'])\nprint(rc, ' '.join(sorted(sys.modules)))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    rc, mods = r.stdout.split(" ", 1)
    assert rc == "0", r.stderr
    loaded = set(mods.split())
    for heavy in ("rich", "elftools", "tree_sitter", "graphviz", "klpforge.kbuild", "klpforge.qemu",
                  "klpforge.ipa", "klpforge.diff.report", "klpforge.commands.build", "klpforge.commands.verify"):
        assert heavy not in loaded, heavy
    assert "klpforge.diff" in loaded and "numpy" in loaded  # the test sees the modules it should


def test_diff_bad_impact_dumps_leave_output_untouched(objs: tuple[Path, Path], tmp_path: Path) -> None:
    # the --impact check runs after the diff: its failure must not leave a new -o behind either
    a, b = objs
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "x.ipa-clones").write_text("garbage;;\n")
    out = tmp_path / "lp.o"
    out.write_bytes(b"old")
    one_line(run("diff", a, b, "-o", out, "--symtab", a, "-q", "--impact", dumps), "not an ipa-clones dump")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dumps", "lp.o"]  # no temporary file


def test_demo_outdir_checks(objs: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = objs
    one_line(run("demo", "--outdir", a), f"--outdir {a}: exists and is not a directory")
    one_line(run("demo", "--outdir", a / "sub"), "cannot create")
