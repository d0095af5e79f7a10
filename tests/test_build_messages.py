"""What ``build`` says (issue 16 items 11 and 12): kpatch-build options, a patch whose paths match no file of the
tree (``-p0``), a refusal for several reasons (one line; the list in the report, the build log and ``--json``),
``--keep-tmp`` on a refused build, the build log kept where the user can read it, and plain progress lines and
uncut tables when the output is not a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout

PATCHES = Path(__file__).parent / "kernel_patches"


def klpforge(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd, check=False)


@pytest.mark.parametrize("flags, says", [
    (["-n", "fix"], "-n is a kpatch-build option: klpforge names the module after its output file: "
                    "-o livepatch-NAME.ko"),
    (["--name", "fix"], "--name is a kpatch-build option: klpforge names the module after its output file"),
    (["-v", "/boot/vmlinux"], "-v is a kpatch-build option: klpforge reads vmlinux from the built tree (-O BUILD); "
                              "with --distro or the plain form give --symbols FILE (also spelled --vmlinux)"),
    (["-d"], "-d is a kpatch-build option: use --keep-tmp"),
    (["-R"], "-R is a kpatch-build option: use --no-replace"),
    (["--skip-cleanup"], "--skip-cleanup is a kpatch-build option: use --keep-tmp"),
    (["--skip-gcc-check"], "--skip-gcc-check is a kpatch-build option: use --skip-compiler-check"),
    (["-r", "kernel.src.rpm"], "-r is a kpatch-build option: use --distro NAME:RELEASE"),
])
def test_kpatch_build_flags_name_the_klpforge_option(tmp_path: Path, flags: list[str], says: str) -> None:
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n")
    # kpatch-build's usual order: options before the patch, the patch last
    r = klpforge("build", "-s", str(tmp_path), *flags, str(patch))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"klpforge build: {says}"), r.stderr
    assert "unrecognized arguments" not in r.stderr


def test_output_directory_as_kpatch_uses_it(tmp_path: Path) -> None:
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n")
    r = klpforge("build", "-s", str(tmp_path), "-o", str(tmp_path), str(patch))
    assert r.returncode == 1
    assert r.stderr == (f"klpforge build: -o {tmp_path}: is a directory; klpforge's -o names the module file "
                        f"(kpatch-build's -o is a directory): -o {tmp_path / 'livepatch-fix.ko'}\n")


def _p0(tmp_path: Path) -> Path:
    """Patch 00 as ``diff -u`` writes it from the top of a tree: no a/ and b/ prefixes (a -p0 patch)."""
    text = (PATCHES / "00-cmdline-noreloc.patch").read_text()
    p = tmp_path / "p0.patch"
    p.write_text(text.replace("--- a/", "--- ").replace("+++ b/", "+++ "))
    return p


P0_SAYS = ('p0.patch: "fs/proc/cmdline.c" (-p1: proc/cmdline.c) is not a file of {src}; the patch\'s paths match '
           "the tree as a -p0 patch: give its paths a/ and b/ prefixes (git diff writes them; or `sed -i -e "
           "'s,^--- ,--- a/,' -e 's,^+++ ,+++ b/,'` on the patch)")


@pytest.mark.kernel
def test_p0_patch_says_the_path_matches_no_file(kernel: KernelLayout, tmp_path: Path) -> None:
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(_p0(tmp_path)), "-o",
                 str(tmp_path / "x.ko"))
    assert r.returncode == 1
    assert r.stderr == "klpforge build: " + P0_SAYS.format(src=kernel.src) + "\n"
    assert "make" not in r.stderr and not (tmp_path / "x.ko").exists()


@pytest.mark.kernel
@pytest.mark.distro
def test_p0_patch_on_distro(tmp_path: Path) -> None:
    from klpforge.distro import debian

    from .test_distro_debian import DISTRO, RELEASE
    if not (debian.release_root(RELEASE) / "prepared.json").is_file():
        pytest.skip(f"Debian {RELEASE} not prepared")
    src = debian.prepare_tree(RELEASE).src
    r = klpforge("build", "--distro", DISTRO, str(_p0(tmp_path)), "-o", str(tmp_path / "x.ko"))
    assert r.returncode == 1
    assert r.stderr == "klpforge build: " + P0_SAYS.format(src=src) + "\n"


@pytest.mark.kernel
def test_refusal_for_several_reasons(kernel: KernelLayout, tmp_path: Path) -> None:
    """Two refused objects: one line on stderr naming the first reason, the count and the kept build log; every
    reason in the report (stdout), the log and --json; --keep-tmp names the directory it kept."""
    patch = tmp_path / "two.patch"
    patch.write_text((PATCHES / "90-refuse-global-data.patch").read_text()
                     + (PATCHES / "91-refuse-init-code.patch").read_text())
    cache = tmp_path / "cache"
    env = dict(os.environ, KLPFORGE_CACHE=str(cache))
    rep = tmp_path / "r.json"
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(patch), "-o", str(tmp_path / "x.ko"),
                 "--json", str(rep), "--keep-tmp", "-j2", env=env)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    logs = sorted((cache / "logs").glob("build-two-*.log"))
    assert len(logs) == 1
    kept = Path(json.loads(rep.read_text())["kept"])
    try:
        assert lines[0] == (
            "klpforge build: 2 unsafe changes refused, the first: data console_printk (.data.console_printk) "
            "changed (bytes): a live patch cannot change data that already exists in the running kernel; keep the "
            "old layout and use a shadow variable (klp_shadow_*) or a callback (every reason in the build log: "
            f"{logs[0]}; temporary files kept in {kept})")
        assert kept.is_dir() and (kept / "orig").is_dir()
        init = ("changed function proc_cmdline_init is in .init.text: init/exit code has already run (or been "
                "freed) in the running kernel, so a live patch cannot change it")
        assert "refused: 2 unsafe changes\n  - data console_printk" in r.stdout and f"  - {init}\n" in r.stdout
        report = json.loads(rep.read_text())
        assert report["result"] == "refused" and report["exit"] == 2 and len(report["reasons"]) == 2
        assert report["reasons"][1] == init and report["log"] == str(logs[0])
        text = logs[0].read_text()
        assert "klpforge: refused:" in text and init in text and "[diff] diffing objects" in text
        assert (cache / "logs/last-failed.log").read_text() == text
        assert not (tmp_path / "x.ko").exists()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


@pytest.mark.kernel
def test_piped_build_prints_progress_and_full_tables(kernel: KernelLayout, tmp_path: Path) -> None:
    """Not a terminal: one plain line per step on stdout (not minutes of nothing), the table at full width
    (``COLUMNS=80``, as test runners and CI shells export, does not cut it)."""
    out = tmp_path / ("a-long-directory-name-so-that-the-report-is-wider-than-eighty-columns" * 2) / "x.ko"
    out.parent.mkdir()
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build),
                 str(PATCHES / "03-meminfo-inlined-static.patch"),
                 "-o", str(out), "-j2", env=dict(os.environ, COLUMNS="80"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:4] == ["klpforge build: [1/6] checking tree and patch",
                                         "klpforge build: [2/6] compiling 1 original object(s)",
                                         "klpforge build: [3/6] compiling patched objects",
                                         "klpforge build: [4/6] diffing objects"]
    assert "…" not in r.stderr
    assert f"{out} (x)" in r.stderr  # the title, wider than 80 columns, whole
    assert f"built {out} in " in r.stderr
