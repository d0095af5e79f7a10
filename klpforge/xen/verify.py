"""Prove a Xen payload in Debian's shipped hypervisor: QEMU boots Xen with Debian's 6.1 kernel as dom0
and a busybox initramfs holding ``xen-livepatch`` and its libraries; dom0's ``/init`` runs the before
check, uploads the payload, applies it, checks it is APPLIED, runs the check, reverts, runs the after
check and unloads, reporting each step on the console as ``<nonce>:<step>:OK|FAIL:<detail>``.

QEMU facts (software emulation): ``-cpu qemu64,+sse4.1,+sse4.2,+popcnt,+ssse3`` (``-cpu max`` crashes
dom0), ``-kernel`` the gunzipped multiboot ``xen``, the dom0 kernel and initramfs as multiboot modules.
dom0 reaches Xen's sysctl through ``/dev/xen/privcmd`` (``xen-privcmd.ko``, CONFIG_XEN_PRIVCMD=m).

>>> res = verify_payload(XenVerifySpec(payload=Path("fix.livepatch"), bins=bins,
...                      check="cat /sys/hypervisor/version/extra"))     # doctest: +SKIP
>>> [s.name for s in res.steps]                                          # doctest: +SKIP
['boot', 'privcmd', 'before', 'upload', 'apply', 'applied', 'check', 'revert', 'after', 'unload']
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import release, start
from .debian import XenBinaries

__all__ = ["XenVerifySpec", "XenStep", "XenVerifyResult", "verify_payload", "guest_init", "newc",
           "STEPS", "xen_reasons"]

STEPS = ("boot", "privcmd", "before", "upload", "apply", "applied", "check", "revert", "after", "unload")
QEMU_CPU = "qemu64,+sse4.1,+sse4.2,+popcnt,+ssse3"
_APPLETS = ("sh", "mount", "insmod", "cat", "echo", "grep", "ls", "mkdir", "poweroff", "sleep", "head",
            "tr", "sed", "dmesg")
_LIBS = ("libxenctrl.so.4.17", "libxentoollog.so.1", "libxencall.so.1", "libxenevtchn.so.1",
         "libxengnttab.so.1", "libxenforeignmemory.so.1", "libxendevicemodel.so.1", "libxentoolcore.so.1")
_HOST_LIBS = (("/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
              ("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"))


@dataclass
class XenVerifySpec:
    payload: Path
    bins: XenBinaries
    check: str
    expect: str | None = None
    before_check: str | None = None
    after_check: str | None = None
    after_expect: str | None = None
    timeout: float = 300.0
    memory: str = "1024M"


@dataclass
class XenStep:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class XenVerifyResult:
    ok: bool
    steps: list[XenStep]
    before_output: str
    check_output: str
    after_output: str
    console: str
    reason: str
    seconds: float


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc cpio archive of ``(path, mode, data)`` (mode with its file-type bits;
    for a symlink, data is the target), as the Linux initramfs unpacker reads it."""
    out = bytearray()
    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name = path.lstrip("/").encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


def guest_init(nonce: str, name: str, spec: XenVerifySpec) -> str:
    """dom0's ``/init``."""
    q = shlex.quote
    lp = "/usr/sbin/xen-livepatch"
    lines = [
        "#!/bin/sh",
        "export PATH=/bin:/usr/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev 2>/dev/null",
        f"N={nonce}",
        'say() { echo "$N:$1:$2:$(echo "$3" | tr "\\n" " " | head -c 300)"; }',
        'fin() { echo "$N:done"; poweroff -f; sleep 30; }',
        'run() { out=$("$@" 2>&1); rc=$?; echo "$out"; return $rc; }',
        'say boot OK "$(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor)'
        '$(cat /sys/hypervisor/version/extra)"',
        "insmod /lib/modules/xen-privcmd.ko; insmod /lib/modules/xenfs.ko",
        "mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen 2>/dev/null",
        'if [ -e /dev/xen/privcmd ] || [ -e /proc/xen/privcmd ]; then say privcmd OK ""; '
        'else say privcmd FAIL "no /dev/xen/privcmd"; fin; fi',
        "section() { echo \"$N:begin:$1\"; sh -c \"$2\" 2>&1; r=$?; echo \"$N:end:$1:$r\"; return $r; }",
    ]
    if spec.before_check:
        lines.append(f'section before {q(spec.before_check)}; say before OK ""')
    else:
        lines.append('say before OK "(none)"')
    lines += [
        f'o=$(run {lp} upload {name} /lib/klp/{name}.livepatch) && say upload OK "$o" || '
        '{ say upload FAIL "$o"; fin; }',
        f'o=$(run {lp} apply {name}) && say apply OK "$o" || {{ say apply FAIL "$o"; fin; }}',
        f'o=$(run {lp} list) ; echo "$o" | grep -q "{name} *| *APPLIED" && say applied OK "" || '
        '{ say applied FAIL "$o"; fin; }',
        f"section check {q(spec.check)} && say check OK \"\" || say check FAIL \"check exited non-zero\"",
        f'o=$(run {lp} revert {name}) && say revert OK "$o" || {{ say revert FAIL "$o"; fin; }}',
    ]
    if spec.after_check:
        lines.append(f'section after {q(spec.after_check)}; say after OK ""')
    else:
        lines.append('say after OK "(none)"')
    lines += [
        f'o=$(run {lp} unload {name}) && say unload OK "$o" || say unload FAIL "$o"',
        f'{lp} list 2>&1 | grep -q "{name}" && say unload FAIL "still listed" ; fin',
    ]
    return "\n".join(lines) + "\n"


def xen_reasons(console: str) -> list[str]:
    """The hypervisor's own livepatch error lines (``(XEN) livepatch: ...``)."""
    return [m.strip() for m in re.findall(r"\(XEN\)[^\n]*livepatch[^\n]*", console)
            if "livepatch: " in m and not re.search(r"(Resolved|Loaded|new symbol|overriding|Undefined symbol "
                                                     r"resolved|Symbol resolved|Absolute symbol)", m)]


def _initramfs(spec: XenVerifySpec, name: str, init: str) -> bytes:
    b = spec.bins
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise InputError("/bin/busybox not found: install Debian's busybox-static package")
    entries: list[tuple[str, int, bytes]] = []
    for d in ("/bin", "/dev", "/proc", "/sys", "/tmp", "/lib", "/lib64", "/lib/x86_64-linux-gnu", "/lib/modules",
              "/lib/klp", "/usr", "/usr/sbin"):
        entries.append((d, 0o40755, b""))
    entries.append(("/bin/busybox", 0o100755, busybox.read_bytes()))
    entries += [(f"/bin/{a}", 0o120777, b"busybox") for a in _APPLETS]
    entries.append(("/init", 0o100755, init.encode()))
    entries.append(("/usr/sbin/xen-livepatch", 0o100755, b.livepatch_tool.read_bytes()))
    for lib in _LIBS:
        p = b.lib_dir / lib
        if not p.exists():
            raise InputError(f"{p}: missing from the unpacked Xen packages")
        entries.append((f"/lib/x86_64-linux-gnu/{lib}", 0o100755, p.read_bytes()))
    for host, guest in _HOST_LIBS:
        entries.append((guest, 0o100755, Path(host).read_bytes()))
    for mod in ("xen-privcmd.ko", "xenfs/xenfs.ko"):
        p = b.modules / "kernel" / "drivers" / "xen" / mod
        entries.append((f"/lib/modules/{Path(mod).name}", 0o100644, p.read_bytes()))
    entries.append((f"/lib/klp/{name}.livepatch", 0o100644, spec.payload.read_bytes()))
    return newc(entries)


def _section(console: str, nonce: str, label: str) -> str:
    m = re.search(rf"{nonce}:begin:{label}\r*\n(.*?){nonce}:end:{label}:", console, re.S)
    return m.group(1).replace("\r", "").strip() if m else ""


def verify_payload(spec: XenVerifySpec, console_log: Path | None = None) -> XenVerifyResult:
    """Boot and prove ``spec.payload`` (see the module docstring). Raises :class:`InputError` when
    QEMU or an input is missing; a failing step is reported in the result, with the reason Xen gave."""
    if not spec.payload.is_file():
        raise InputError(f"{spec.payload}: no such file")
    if spec.payload.read_bytes()[:4] != b"\x7fELF":
        raise InputError(f"{spec.payload}: not an ELF payload")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise InputError("qemu-system-x86_64 not found: install Debian's qemu-system-x86 package")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", spec.payload.stem)[:40] or "payload"
    nonce = secrets.token_hex(6)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="klpforge-xenverify-") as td:
        tdp = Path(td)
        cpio = tdp / "initramfs.cpio"
        cpio.write_bytes(_initramfs(spec, name, guest_init(nonce, name, spec)))
        vmlinuz = tdp / "vmlinuz"
        os.symlink(spec.bins.vmlinuz, vmlinuz)
        xen = tdp / "xen"
        os.symlink(spec.bins.xen, xen)
        cmd = [qemu, "-machine", "accel=tcg", "-cpu", QEMU_CPU, "-m", spec.memory, "-nographic",
               "-no-reboot", "-kernel", str(xen), "-append", "console=com1 dom0_mem=512M,max:512M",
               "-initrd", f"{vmlinuz} console=hvc0,{cpio}"]
        console = _run_qemu(cmd, nonce, spec.timeout)
    if console_log is not None:
        atomic_write(console_log, console)
    steps: list[XenStep] = []
    for m in re.finditer(rf"{nonce}:(\w+):(OK|FAIL):([^\r\n]*)", console):
        steps.append(XenStep(m.group(1), m.group(2) == "OK", m.group(3).strip()))
    before = _section(console, nonce, "before")
    check = _section(console, nonce, "check")
    after = _section(console, nonce, "after")
    reason = ""
    failed = next((s for s in steps if not s.ok), None)
    done = [s.name for s in steps]
    if failed is not None:
        why = xen_reasons(console)
        reason = f"step {failed.name} failed: {failed.detail}" + (f"; Xen says: {' | '.join(why)}" if why else "")
    elif done != list(STEPS):
        missing = next(s for s in STEPS if s not in done)
        reason = f"step {missing} never reported (timeout {spec.timeout:.0f} s or guest crash)"
    else:
        if spec.expect is not None and spec.expect not in check:
            reason = f"check output does not contain {spec.expect!r}"
        elif spec.after_expect is not None and spec.after_expect not in after:
            reason = f"after-check output does not contain {spec.after_expect!r}"
    return XenVerifyResult(not reason, steps, before, check, after, console, reason, time.monotonic() - t0)


def _run_qemu(cmd: list[str], nonce: str, timeout: float) -> str:
    # klpforge.util.proc: its own group, ended on a signal, and killed by the kernel if klpforge dies (SIGKILL)
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = bytearray()
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    end = f"{nonce}:done".encode()
    try:
        while time.monotonic() < deadline:
            chunk = proc.stdout.read()
            if chunk:
                buf += chunk
                if end in buf:
                    time.sleep(0.5)
                    break
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.1)
    finally:
        early = proc.poll() is None
        if early:
            proc.kill()
        proc.wait()
        release(proc, early)
        rest = proc.stdout.read()
        if rest:
            buf += rest
    return buf.decode(errors="replace")
