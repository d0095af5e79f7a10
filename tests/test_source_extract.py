"""``klpforge extract`` then ``klpforge build --from-source`` on the 6.1 test kernel's patches: the module
built from the extracted C loads, transitions and passes the binary-diff module's behaviour check
(tests/test_kernel_e2e.py's cases), and the cross-check finds the same code per function.

Covered: a static the compiler inlined into its caller (03: show_val_kb copied, meminfo_proc_show
replaced), a new function (02), a function of a module (05), a new global of one object called from
another (10), a function whose static callees and WARN_ONCE statics are the running kernel's (12). Refused
with what and why: an .isra clone (04), a function defined by a macro (11).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout

from .test_kernel_e2e import CASES, PATCHES

pytestmark = pytest.mark.kernel

WORKS = ["01-cmdline-text.patch", "02-version-new-function.patch", "03-meminfo-inlined-static.patch",
         "05-kobject-module-function.patch", "10-new-global-across-objects.patch", "12-do-wait-sleeping.patch"]


def klpforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout)


def _extract(kernel: KernelLayout, patch: str, out: Path) -> subprocess.CompletedProcess[str]:
    return klpforge("extract", "-s", str(kernel.src), "-O", str(kernel.build), "-j2", str(PATCHES / patch),
                    "-o", str(out))


@pytest.mark.parametrize("patch", WORKS)
def test_extract_build_from_source_verify(kernel: KernelLayout, tmp_path: Path, patch: str) -> None:
    case = next(c for c in CASES if c.patch == patch)
    d = tmp_path / "lp"
    r = _extract(kernel, patch, d)
    assert r.returncode == 0, r.stderr
    units = sorted(p for p in d.glob("*.c") if p.name != "klp_patch.c")
    assert units and (d / "Kbuild").is_file() and (d / "klpforge-extract.json").is_file()
    text = "\n".join(u.read_text() for u in units)
    for f in case.functions:  # every function the binary diff replaces is in the source, with its reason
        assert "/* klpforge: replaced: " in text and f" {f}(" in text, f
    ko = tmp_path / "lp.ko"
    b = klpforge("build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build), "-j2",
                 "-o", str(ko))
    assert b.returncode == 0, b.stderr
    for f in case.functions:
        assert f"cross-check {f}: same" in b.stderr
    args = [str(ko), "--kernel", str(kernel.bzimage), "--check", case.check, "--timeout", "300"]
    if case.expect:
        args += ["--expect", case.expect]
    if case.after_check:
        args += ["--after-check", case.after_check, "--after-expect", case.after_expect or ""]
    if case.setup:
        args += ["--setup", case.setup]
    for f in case.files:
        args += ["--file", str(kernel.build / f)]
    v = klpforge("verify", *args)
    assert v.returncode == 0, v.stdout + v.stderr


def test_inlined_static_is_copied_and_statics_declared(kernel: KernelLayout, tmp_path: Path) -> None:
    """03: show_val_kb has no symbol (inlined): copied with the patched text; the user's directory is not
    written by build --from-source; a reviewed edit that changes the code fails the cross-check (exit 2)
    unless --force-source."""
    d = tmp_path / "lp"
    assert _extract(kernel, "03-meminfo-inlined-static.patch", d).returncode == 0
    src = (d / "fs_proc_meminfo.c").read_text()
    assert "/* klpforge: copied: no symbol show_val_kb in the running kernel" in src
    assert 'seq_write(m, " KiB\\n", 5);' in src
    assert "proc_meminfo_init" not in src  # not needed: left out
    before = sorted(p.name for p in d.iterdir())
    src = src.replace('seq_write(m, " KiB\\n", 5);', 'seq_write(m, " KiB!\\n", 6);')
    (d / "fs_proc_meminfo.c").write_text(src)
    ko = tmp_path / "lp.ko"
    b = klpforge("build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build), "-o", str(ko))
    assert b.returncode == 2, b.stderr
    assert "cross-check with the binary diff failed for 1 function(s): meminfo_proc_show:" in b.stderr
    assert "--force-source" in b.stderr and not ko.exists()
    b = klpforge("build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build), "-o", str(ko),
                 "--force-source")
    assert b.returncode == 0 and "cross-check differences forced" in b.stderr and ko.is_file()
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("patch,msg", [
    ("04-oom-adj-isra-clone.patch", "the binary diff replaces __set_oom_adj.isra.0, a compiler clone of "
                                    "__set_oom_adj with its own calling convention"),
    ("11-kpatch-syscall.patch", "__x64_sys_newuname (replaced: "),
])
def test_refused_with_what_and_why(kernel: KernelLayout, tmp_path: Path, patch: str, msg: str) -> None:
    r = _extract(kernel, patch, tmp_path / "lp")
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lp").exists() and not list(tmp_path.iterdir())

