"""Live patches for a kernel with CONFIG_X86_KERNEL_IBT (issue 15): objtool runs on the linked module only.

The kernel is the 6.1 test kernel's IBT variant (``klpforge kernel prepare --variant ibt``). QEMU's software
CPU checks no ENDBR, so what IBT changes is checked structurally -- ENDBR at each new function's entry,
ORC entries for every replaced function (objtool at the module link must have seen every call), the seal
list -- and by what the guest shows: a stack read through the patched function (the ORC unwinder walks
past it only with its ORC entries). The sealed-ENDBR case is ``../shared/cases/build/ibt-sealed-global``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from klpforge.elf import ElfFile
from klpforge.elf import constants as C
from klpforge.kbuild.module import check_orc, orc_places
from klpforge.kbuild.prepare import KernelLayout
from klpforge.kbuild.testkernel import prepared_kernel, require_kernel
from klpforge.util.errors import UnsafeChange

from .conftest import SHARED
from .test_kernel_e2e import PATCHES, klpforge

pytestmark = pytest.mark.kernel

SHARED_CASE = SHARED / "cases" / "build" / "ibt-sealed-global"
ENDBR64 = bytes.fromhex("f30f1efa")


@pytest.fixture(scope="module")
def ibt_kernel() -> KernelLayout:
    lay = prepared_kernel(variant="ibt")
    if lay is None:
        if require_kernel():
            pytest.fail("KLPFORGE_REQUIRE_KERNEL=1 but no IBT kernel: run `klpforge kernel prepare --variant ibt`")
        pytest.skip("no IBT kernel (run `klpforge kernel prepare --variant ibt`)")
    assert "CONFIG_X86_KERNEL_IBT=y" in (lay.build / ".config").read_text()
    return lay


def build(kernel: KernelLayout, patch: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(patch), "-o", str(out),
                    "--json", str(out.with_suffix(".json")))


def new_functions(ko: Path) -> dict[str, tuple[int, int, int]]:
    """klp_func new symbols of ``ko`` (the ``klpf_`` aliases) -> (section, value, size)."""
    elf = ElfFile.open(ko, require_rel=True)
    return {n: (int(elf.syms["shndx"][i]), int(elf.syms["value"][i]), int(elf.syms["size"][i]))
            for i, n in enumerate(elf.sym_names)
            if n.startswith("klpf_") and int(elf.syms["info"][i]) & 0xF == C.STT_FUNC}


def vmlinux_entry(kernel: KernelLayout, name: str) -> bytes:
    """The first 4 bytes of function ``name`` in the kernel's vmlinux file (sealing happens at boot: the
    file keeps every ENDBR)."""
    elf = ElfFile.open(kernel.build / "vmlinux")
    i = elf.sym_names.index(name)
    sec, v = int(elf.syms["shndx"][i]), int(elf.syms["value"][i])
    off = v - int(elf.shdrs["addr"][sec])
    return elf.section_bytes(sec)[off:off + 4]


def test_ibt_build_has_orc_endbr_and_unwinds_through_the_patch(ibt_kernel: KernelLayout, tmp_path: Path) -> None:
    """kernel_clone and kernel_wait4 replaced (two objects, klp relocations to statics of each file): the
    .ko's ORC covers each, each starts with ENDBR exactly when the kernel's own copy does, and in the guest
    the stack of a shell waiting in do_wait reads through the new kernel_wait4 into the syscall."""
    ko = tmp_path / "livepatch-ibt.ko"
    r = build(ibt_kernel, PATCHES / "08-fork-exit-two-objects.patch", ko)
    assert r.returncode == 0, r.stderr
    report = json.loads(ko.with_suffix(".json").read_text())
    # (dup_mmap may join: its pr_*_once flag is renumbered by the new one; test_kernel_e2e allows it too)
    assert {"kernel_clone", "kernel_wait4"} <= {f["old_name"] for o in report["objects"] for f in o["functions"]}
    funcs = new_functions(ko)
    assert {"klpf_vmlinux__kernel_clone__0", "klpf_vmlinux__kernel_wait4__0"} <= set(funcs)
    elf = ElfFile.open(ko, require_rel=True)
    places = orc_places(ko)
    for name, (sec, v, size) in funcs.items():
        old = name.removeprefix("klpf_vmlinux__").removesuffix("__0")
        had = vmlinux_entry(ibt_kernel, old) == ENDBR64  # gcc gives one to globals, not to static dup_mmap
        assert had or old == "dup_mmap", old
        assert (elf.section_bytes(sec)[v:v + 4] == ENDBR64) == had, name
        assert any(v <= p < v + size for p in places.get(sec, [])), f"no ORC entry for {name}"
    check = ("sh -c 'sleep 600; true' & sleep 0.5; cat /proc/$!/stack > /tmp/st; kill $!; cat /tmp/st; "
             "grep -A1 'kernel_wait4.*livepatch_ibt' /tmp/st | grep -q sys_wait4 && echo unwound-through-patch")
    v = klpforge("verify", str(ko), "--kernel", str(ibt_kernel.bzimage), "--check", check,
                 "--expect", "unwound-through-patch", "--console-log", str(tmp_path / "console.log"), timeout=300)
    assert v.returncode == 0, v.stderr + (tmp_path / "console.log").read_text()[-3000:]
    # the same module without its ORC table is refused, naming the functions, never written
    bare = tmp_path / "bare.ko"
    subprocess.run(["objcopy", "--remove-section=.orc_unwind_ip", "--remove-section=.rela.orc_unwind_ip",
                    "--remove-section=.orc_unwind", str(ko), str(bare)], check=True)
    with pytest.raises(UnsafeChange, match=rf"no ORC unwind entries for {len(funcs)} of its functions "
                                           r"\(.*klpf_vmlinux__kernel_clone__0, klpf_vmlinux__kernel_wait4__0"):
        check_orc(bare, list(funcs), ["objtool: kernel_wait4+0x1a: can't find jump dest"], tmp_path / "log")


def test_sealed_endbr_address_is_refused(ibt_kernel: KernelLayout, tmp_path: Path) -> None:
    """expected.txt of ibt-sealed-global: kernel_wait4's new code takes the address of
    is_current_pgrp_orphaned, whose ENDBR vmlinux sealed: refused (exit 2) naming both, nothing written."""
    if not (SHARED_CASE / "fix.patch").is_file():
        pytest.skip(f"{SHARED_CASE} not present")
    ko = tmp_path / "livepatch-sealed.ko"
    r = build(ibt_kernel, SHARED_CASE / "fix.patch", ko)
    assert r.returncode == 2, r.stderr
    assert "kernel_wait4 takes the address of is_current_pgrp_orphaned" in r.stderr
    assert "ENDBR" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not ko.exists()


def test_ibt_variant_has_its_own_build_and_the_default_source(tmp_path: Path) -> None:
    """The variant builds in kernel-6.1-ibt with the default fragment plus CONFIG_X86_KERNEL_IBT=y, from the
    default kernel's unpacked source; the default kernel's layout and fragment are unchanged."""
    from klpforge.kbuild.prepare import fragment_lines, fragment_text

    ibt, default = KernelLayout.default("6.1", tmp_path, "ibt"), KernelLayout.default("6.1", tmp_path)
    assert ibt.build == tmp_path / "kernel-6.1-ibt" / "build" and default.build == tmp_path / "kernel-6.1" / "build"
    assert ibt.src == default.src == tmp_path / "kernel-6.1" / "linux-source-6.1"
    want, base = fragment_lines(fragment_text("6.1", "ibt")), fragment_lines(fragment_text("6.1"))
    assert want["CONFIG_X86_KERNEL_IBT"] == "CONFIG_X86_KERNEL_IBT=y" and "CONFIG_X86_KERNEL_IBT" not in base
    assert {k: v for k, v in want.items() if k != "CONFIG_X86_KERNEL_IBT"} == base


def test_objtool_flags_follow_the_config(ibt_kernel: KernelLayout) -> None:
    """scripts/Makefile.lib: objtool runs on the linked module (--link) with --ibt on the IBT kernel, per
    object without them on the default one."""
    from klpforge.kbuild.objtool import delayed, objtool_args, read_config

    ibt = read_config(ibt_kernel.build / ".config")
    assert delayed(ibt)
    args = objtool_args(ibt, module=True)
    assert {"--ibt", "--orc", "--link", "--module"} <= set(args) and args[-2:] == ["--link", "--module"]
    default = prepared_kernel()
    if default is not None:
        plain = read_config(default.build / ".config")
        assert not delayed(plain) and "--ibt" not in objtool_args(plain, module=True)
        assert "--link" not in objtool_args(plain, module=True)


def test_sealed_case_builds_without_ibt(tmp_path: Path) -> None:
    """Control: on the default kernel (no IBT, no seal list) the same patch builds: the refusal comes from
    the seal list, not from taking an address."""
    kernel = prepared_kernel()
    if kernel is None or not (SHARED_CASE / "fix.patch").is_file():
        pytest.skip("no default kernel or no shared case")
    ko = tmp_path / "livepatch-plain.ko"
    r = build(kernel, SHARED_CASE / "fix.patch", ko)
    assert r.returncode == 0, r.stderr
    assert ko.is_file()
