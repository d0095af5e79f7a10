"""``klpforge extract`` then ``klpforge build --from-source`` on the 6.1 test kernel's patches: the module
built from the extracted C loads, transitions and passes the binary-diff module's behaviour check
(tests/test_kernel_e2e.py's cases), and the cross-check finds the same code per function.

Covered: a static the compiler inlined into its caller (03: show_val_kb copied, meminfo_proc_show
replaced), a new function (02), a function of a module (05), a new global of one object called from
another (10), a function whose static callees and WARN_ONCE statics are the running kernel's (12); a
function the running kernel has only as a GCC clone, replaced through the clone's callers: IPA-SRA (04),
ipa-split then IPA-CP (40, ``traverse.part.0.constprop.0``), IPA-CP (41). Refused with what and why: a
function defined by a macro (11). Callbacks and a shadow variable (06): the KPATCH_*_CALLBACK functions
copied, named by klp_patch.c's klp_object callbacks, cross-checked with the binary diff's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout

from .test_kernel_e2e import CASES, PATCHES

pytestmark = pytest.mark.kernel

WORKS = ["01-cmdline-text.patch", "02-version-new-function.patch", "03-meminfo-inlined-static.patch",
         "05-kobject-module-function.patch", "10-new-global-across-objects.patch", "12-do-wait-sleeping.patch",
         "08-fork-exit-two-objects.patch", "09-header-static-inline.patch", "06-uptime-callbacks-shadow.patch"]
#: the cross-check's verdict per function where it is not "same" (09: __proc_create compiled without the
#: bodies of generic.c's other functions: register allocation differs, references equal)
VERDICT = {"__proc_create": "equivalent: code differs"}
#: functions GCC had inlined into a replaced one although they have a symbol: copied, so that the module
#: inlines them too (08: a call to the kernel's vm_area_free made dup_mmap 1217 bytes, the binary diff's 1224)
COPIED = {"08-fork-exit-two-objects.patch": "/* klpforge: copied: GCC inlined vm_area_free into dup_mmap in the "
                                            "running kernel: copied so that it is inlined again */\nvoid vm_area_free(",
          "09-header-static-inline.patch": "/* klpforge: copied: GCC inlined proc_set_user into __proc_create in the "
                                           "running kernel: copied so that it is inlined again */\nvoid proc_set_user("}


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
        assert "/* klpforge: replaced: " in text and re.search(rf"[ *]{f}\(", text), f
    if patch in COPIED:
        assert COPIED[patch] in text
    ko = tmp_path / "lp.ko"
    b = klpforge("build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build), "-j2",
                 "-o", str(ko))
    assert b.returncode == 0, b.stderr
    for f in case.functions:
        assert f"cross-check {f}: {VERDICT.get(f, 'same')}" in b.stderr
    if case.dmesg:  # callbacks: each the binary diff's code, each wired into the klp_object
        klp = (d / "klp_patch.c").read_text()
        for kind in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
            assert f"cross-check klpforge_{kind}: same" in b.stderr and f".{kind} = klpforge_cb_" in klp
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
    ("11-kpatch-syscall.patch", "__x64_sys_newuname (replaced: reference at +0xa changed: gone __do_sys_newuname "
                                "-> new __kpatch_do_sys_newuname) is made by the macro "
                                "KPATCH_SYSCALL_DEFINE1(newuname, ...) in kernel/sys.c: extract writes C function "
                                "definitions by name"),
])
def test_refused_with_what_and_why(kernel: KernelLayout, tmp_path: Path, patch: str, msg: str) -> None:
    r = _extract(kernel, patch, tmp_path / "lp")
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lp").exists() and not list(tmp_path.iterdir())



#: (patch, clone the binary diff replaces, its C function, callers the source replaces instead (beyond the
#: binary diff's own set), check, expected output). Callers are those of the 6.1 test kernel's objects
#: compiled with -ffunction-sections (every call to the clone is then a relocation).
CLONES = [
    ("04-oom-adj-isra-clone.patch", "__set_oom_adj.isra.0", "__set_oom_adj", {"oom_adj_write", "oom_score_adj_write"},
     "echo 123 > /proc/self/oom_score_adj && dmesg | grep klpforge-oom", "klpforge-oom: 123"),
    ("40-seq-traverse-part-constprop.patch", "traverse.part.0.constprop.0", "traverse", set(),
     "dd if=/proc/version bs=4 skip=2 count=1 2>/dev/null >/dev/null; dmesg | grep klpforge-traverse",
     "seq_file: klpforge-traverse: 8"),
    ("41-sysctl-get-long-constprop.patch", "proc_get_long.constprop.0", "proc_get_long",
     {"__do_proc_dointvec", "__do_proc_douintvec", "__do_proc_doulongvec_minmax", "proc_do_large_bitmap"},
     "echo 11 > /proc/sys/kernel/printk_ratelimit_burst; dmesg | grep klpforge-sysctl", "klpforge-sysctl: 11"),
]


@pytest.mark.parametrize("patch,clone,base,callers,check,expect", CLONES, ids=[c[0][:2] for c in CLONES])
def test_clone_replaced_through_its_callers(kernel: KernelLayout, tmp_path: Path, patch: str, clone: str, base: str,
                                            callers: set[str], check: str, expect: str) -> None:
    """The binary diff replaces a GCC clone; the C source copies the clone's function and replaces the
    clone's callers (found by the impact analysis of the original object's -fdump-ipa-clones dump); the
    module loads and behaves as patched in QEMU; the cross-check compares the module's own clone with the
    binary diff's, and each caller with the binary diff's patched object."""
    d = tmp_path / "lp"
    r = _extract(kernel, patch, d)
    assert r.returncode == 0, r.stderr
    man = json.loads((d / "klpforge-extract.json").read_text())
    (obj,) = man["objects"]
    assert clone in [f["old_name"] for f in obj["functions"]]
    replaced = {f["old_name"] for f in obj["source_functions"]}
    assert clone not in replaced and callers <= replaced and set(obj["clones"][clone]) <= replaced
    assert {f["old_name"] for f in obj["source_functions"] if f["compare"] == "reference"} == callers
    assert (d / obj["reference"]).is_file()
    src = (d / f"{obj['unit']}.c").read_text()
    assert f"/* klpforge: copied: the running kernel has {base} only as the " in src
    assert f"static int {base}(" in src
    klp = (d / "klp_patch.c").read_text()
    assert f'.old_name = "{clone}"' not in klp
    for c in callers:
        assert f"/* klpforge: replaced: calls {clone}, the " in src and f'.old_name = "{c}"' in klp
    assert "/tmp/klpforge-build-" not in src  # the reasons name tree paths, not klpforge's temporaries
    ko = tmp_path / "lp.ko"
    b = klpforge("build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build), "-j2",
                 "-o", str(ko))
    assert b.returncode == 0, b.stderr
    for f in {clone} | replaced:
        assert f"cross-check {f}: same" in b.stderr
    v = klpforge("verify", str(ko), "--kernel", str(kernel.bzimage), "--check", check, "--expect", expect,
                 "--timeout", "300")
    assert v.returncode == 0, v.stdout + v.stderr


def test_clone_caller_edit_fails_the_cross_check(kernel: KernelLayout, tmp_path: Path) -> None:
    """A reviewed edit of a clone's caller (which the binary diff does not ship) is caught by comparing it
    with the binary diff's patched object; an edit of the copied function, by the clone comparison."""
    d = tmp_path / "lp"
    assert _extract(kernel, "04-oom-adj-isra-clone.patch", d).returncode == 0
    unit = d / "fs_proc_base.c"
    orig = unit.read_text()
    args = ["build", "--from-source", str(d), "-s", str(kernel.src), "-O", str(kernel.build),
            "-o", str(tmp_path / "x.ko")]
    edited = orig.replace("oom_adj = OOM_SCORE_ADJ_MAX;", "oom_adj = OOM_SCORE_ADJ_MAX - 1;", 1)
    assert edited != orig
    unit.write_text(edited)
    b = klpforge(*args)
    assert b.returncode == 2, b.stderr
    assert "cross-check with the binary diff failed for 1 function(s): oom_adj_write: " in b.stderr
    assert "the binary diff's object fs_proc_base.o" in b.stderr
    edited = orig.replace('"klpforge-oom: %d\\n"', '"klpforge-oom: %d!\\n"')
    assert edited != orig
    unit.write_text(edited)
    b = klpforge(*args)
    assert b.returncode == 2, b.stderr
    # the pr_info is in the cold part GCC split out of the clone: compared too
    assert "__set_oom_adj.isra.0: relocation differs: the binary-diff module" in b.stderr
    assert "(in its cold part)" in b.stderr
