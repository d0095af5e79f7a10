"""verify: boot the prepared 6.1 kernel under QEMU with the kernel's own livepatch sample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout
from klpforge.qemu.verify import guest_init, parse_console

pytestmark = pytest.mark.kernel


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", "verify", *args],
                          capture_output=True, text=True, timeout=300)


def test_sample_livepatch_verified(kernel: KernelLayout, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    r = _verify(str(ko), "--kernel", str(kernel.bzimage), "--check", "cat /proc/cmdline",
                "--expect", "this has been live patched", "--after-check", "cat /proc/cmdline",
                "--after-expect", "console=ttyS0", "--console-log", str(log))
    assert r.returncode == 0, r.stderr
    assert "verified livepatch-sample.ko" in r.stderr
    text = log.read_text()
    assert "livepatch: 'livepatch_sample': patching complete" in text
    assert "livepatch: 'livepatch_sample': unpatching complete" in text


def test_wrong_expectation_fails_with_log(kernel: KernelLayout, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    r = _verify(str(ko), "--kernel", str(kernel.bzimage), "--check", "cat /proc/cmdline",
                "--expect", "not there", "--console-log", str(log))
    assert r.returncode == 1
    assert "check output does not contain 'not there'" in r.stderr
    assert log.is_file() and "this has been live patched" in log.read_text()


def test_failing_check_command_fails(kernel: KernelLayout) -> None:
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    r = _verify(str(ko), "--kernel", str(kernel.bzimage), "--check", "test -e /nonexistent")
    assert r.returncode == 1
    assert "check `test -e /nonexistent` exited 1" in r.stderr
    assert "console log:" in r.stderr


def test_non_livepatch_module_refused(kernel: KernelLayout) -> None:
    ko = kernel.build / "samples/kobject/kobject-example.ko"
    r = _verify(str(ko), "--kernel", str(kernel.bzimage), "--check", "true")
    assert r.returncode == 1
    assert "not a livepatch module" in r.stderr


def test_kernel_that_is_not_a_bzimage_is_named(kernel: KernelLayout) -> None:
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    r = _verify(str(ko), "--kernel", str(kernel.build / "vmlinux"), "--check", "true")
    assert r.returncode == 1
    assert r.stderr == (f'klpforge verify: {kernel.build / "vmlinux"}: not a bzImage (no "HdrS" boot header at '
                        "0x202: an ELF file: pass arch/x86/boot/bzImage, not vmlinux)\n")


def test_bad_accel_reports_qemu_own_error_unwrapped(kernel: KernelLayout, tmp_path: Path) -> None:
    """QEMU's own complaint, not "kernel did not reach /init", on one line however long."""
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    log = tmp_path / "console.log"
    r = _verify(str(ko), "--kernel", str(kernel.bzimage), "--check", "true", "--accel", "nosuch",
                "--console-log", str(log))
    assert r.returncode == 1
    last = r.stderr.splitlines()[-1]
    assert last == (f"klpforge verify: failed: qemu-system-x86_64: -accel nosuch: invalid accelerator nosuch "
                    f"(console log: {log})")
    assert len(last) > 80


def test_sigterm_during_boot_ends_qemu(kernel: KernelLayout, tmp_path: Path) -> None:
    """SIGTERM while QEMU runs: one line, exit 143, QEMU gone, the temporary directory removed."""
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "klpforge", "verify", str(ko), "--kernel", str(kernel.bzimage),
                             "--check", "sleep 600"], env=dict(os.environ, TMPDIR=str(tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemu = None
    deadline = time.monotonic() + 120
    while qemu is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        for d in Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if d.name.isdigit() and "(qemu-system-x86" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                qemu = int(d.name)
        time.sleep(0.05)
    time.sleep(1)  # booting
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err == "klpforge verify: terminated by SIGTERM\n"
    assert not Path(f"/proc/{qemu}").exists() or "(qemu" not in Path(f"/proc/{qemu}/stat").read_text()
    assert list(tmp.iterdir()) == []


def test_markers_cannot_be_faked_by_check_output() -> None:
    script = guest_init("KLPVabc", "p", "/lib/klp/p.ko", [])
    assert "KLPVabc" in script
    console = "KLPVabc:boot:OK:x\nKLPVabc:CHECK-BEGIN\nKLPVzzz:RESULT:DONE\nKLPVabc:CHECK-END:0\n"
    steps, out, rc, _after, _dmesg, result = parse_console(console, "KLPVabc")
    assert [s.name for s in steps] == ["boot"]
    assert result is None and rc == 0 and "KLPVzzz" in out
