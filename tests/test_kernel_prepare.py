"""kernel prepare: the cached test kernel (built once, e.g. by CI before the tests)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from klpforge.kbuild.prepare import KernelLayout, check_config, fragment_lines, fragment_text

pytestmark = pytest.mark.kernel


def test_prepare_is_cached_and_evaluable(kernel: KernelLayout) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "klpforge", "kernel", "prepare"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20, "a prepared kernel must not be rebuilt"
    assert "cached" in r.stderr
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env["KERNEL_SRC"] == str(kernel.src)
    assert env["KERNEL_BUILD"] == str(kernel.build)
    assert env["BZIMAGE"] == str(kernel.bzimage)
    sh = subprocess.run(["sh", "-c", 'eval "$(cat)"; test -f "$BZIMAGE" && test -d "$KERNEL_SRC" && echo ok'],
                        input=r.stdout, capture_output=True, text=True)
    assert sh.stdout.strip() == "ok"


def test_every_fragment_line_landed(kernel: KernelLayout) -> None:
    wanted = fragment_lines(fragment_text("6.1"))
    assert check_config((kernel.build / ".config").read_text(), wanted) == []


def test_artifacts_needed_by_build_and_verify(kernel: KernelLayout) -> None:
    for rel in ("vmlinux", "Module.symvers", "modules.order", "usr/gen_init_cpio",
                "samples/livepatch/livepatch-sample.ko", "samples/kobject/kobject-example.ko"):
        assert (kernel.build / rel).is_file(), rel
    assert kernel.initramfs.is_file()
    head = kernel.initramfs.read_bytes()[:6]
    assert head == b"070701"  # newc cpio
