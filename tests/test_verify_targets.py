"""verify never says "verified" for a live patch that patched nothing (issue 16 item 4), on the 6.1 test kernel.

A live patch of ``kobject-example.ko`` (``tests/kernel_patches/05-kobject-module-function.patch``) is built once;
verify must fail, naming the module and the file to preload, when that module is not loaded, and pass when it
is (preloaded, or loaded by the check itself: ``klp_module_coming``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout
from klpforge.qemu.targets import PatchTarget, module_targets, patch_targets

pytestmark = pytest.mark.kernel

PATCHES = Path(__file__).parent / "kernel_patches"
KOBJ = "samples/kobject/kobject-example.ko"


def klpforge(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def kobject_ko(kernel: KernelLayout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kobj") / "livepatch-kobj.ko"
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build),
                 str(PATCHES / "05-kobject-module-function.patch"), "-o", str(out), "-j2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_targets_read_from_the_module(kobject_ko: Path, kernel: KernelLayout) -> None:
    assert patch_targets(kobject_ko) == [PatchTarget("kobject_example", ["foo_show"])]
    assert module_targets(kobject_ko) == ["kobject_example"]
    # the kernel's own sample (not built by klpforge, no klp relocations): nothing to read, the guest decides
    assert patch_targets(kernel.build / "samples/livepatch/livepatch-sample.ko") == []


def test_target_module_not_loaded_fails_naming_it(kobject_ko: Path, kernel: KernelLayout) -> None:
    v = klpforge("verify", str(kobject_ko), "--kernel", str(kernel.bzimage), "--check", "true")
    assert v.returncode == 1, v.stderr
    last = v.stderr.splitlines()[-1]
    assert last.startswith(
        "klpforge verify: failed: step patched failed: kobject_example: module not loaded in the guest, its 1 "
        f"function(s) were not patched (--preload {kernel.build / KOBJ}, or insmod it in --setup or --check)"), last
    assert "verified" not in v.stderr


def test_target_module_preloaded_passes(kobject_ko: Path, kernel: KernelLayout) -> None:
    v = klpforge("verify", str(kobject_ko), "--kernel", str(kernel.bzimage), "--preload", str(kernel.build / KOBJ),
                 "--check", "cat /sys/kernel/kobject_example/foo", "--expect", "0 klpforge")
    assert v.returncode == 0, v.stderr
    assert "patched     ok kobject_example (1 function)" in v.stderr


def test_vmlinux_patch_lists_vmlinux(kernel: KernelLayout) -> None:
    """The kernel's own sample: the guest reads the object list from sysfs, whoever built the module."""
    v = klpforge("verify", str(kernel.build / "samples/livepatch/livepatch-sample.ko"), "--kernel",
                 str(kernel.bzimage), "--check", "cat /proc/cmdline", "--expect", "this has been live patched")
    assert v.returncode == 0, v.stderr
    assert "patched     ok vmlinux (1 function)" in v.stderr
