"""Issue 20's acceptance test: a ``klpforge package`` .deb in a real Debian userspace with systemd, booted under
QEMU on the kernel Debian ships (bookworm, 6.1.0-56-amd64).

The root file system is made once with mmdebstrap (minbase + systemd-sysv, udev, kmod, initramfs-tools and the exact
``linux-image-6.1.0-56-amd64``, from the Debian archive klpforge's own apt configuration names
(:func:`klpforge.distro.apt.mirrors`), verified by apt against debian-archive-keyring) and cached as a tar file in
``$KLPFORGE_CACHE/host/``: about 6 minutes and 230 MB of downloads the first time. Each run unpacks it into an ext4
image (``mkfs.ext4 -d``) with the package and a one-shot test service, and boots it twice with Debian's own kernel and
initrd:

1. ``dpkg -i`` (its ``Depends`` on the kernel image is met by the real package): the postinst loads the patch,
   ``/proc/net/sockstat`` shows the fix;
2. the next boot: the package's unit loaded the patch (``systemctl status``, its journal lines), the fix is
   there, ``klpforge list`` (on the host, reading the guest's sysfs copy) shows it enabled and installed by the
   package; a copy of the module for another release and a patch for ``nfsd`` (not loaded) are refused with
   the reason; ``dpkg -r`` unloads it and the fix is gone.

Skips without the cache unless ``KLPFORGE_REQUIRE_KERNEL=1`` or ``KLPFORGE_DISTRO=1``. Slow under software
emulation: each boot takes 1 to 5 minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_host import _parse_guest, _rebuild

pytestmark = [pytest.mark.distro, pytest.mark.kernel]

RELEASE = "6.1.0-56-amd64"
OTHER = "6.1.0-99-amd64"  # same length: the module stays well-formed
ROOT = Path(__file__).resolve().parent.parent
def _sources() -> list[str]:
    """bookworm's suites from klpforge's own apt configuration (hosts, keyring), never the system's lists."""
    from klpforge.distro.apt import KEYRING, mirrors

    m = mirrors()
    return [f"deb [signed-by={KEYRING}] {m['debian']} bookworm main",
            f"deb [signed-by={KEYRING}] {m['debian']} bookworm-updates main",
            f"deb [signed-by={KEYRING}] {m['debian-security']} bookworm-security main"]
PACKAGES = f"systemd-sysv,udev,kmod,initramfs-tools,linux-image-{RELEASE}"


def klpforge(*args: str, cwd: Path | None = None, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _cache() -> Path:
    return Path(os.environ.get("KLPFORGE_CACHE") or Path.home() / ".cache/klpforge")


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """The cached root file system as a tar file (made here when missing and allowed). A tar, not a directory:
    the root's /tmp and /var/tmp are world-writable, which klpforge refuses in its cache."""
    d = _cache() / "host" / f"bookworm-systemd-{RELEASE}"
    tar = d / "rootfs.tar"
    if os.geteuid() != 0:
        pytest.skip("the root file system needs root (mmdebstrap's root mode, ownership in the image)")
    if tar.is_file():
        return tar
    if not (os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1" or os.environ.get("KLPFORGE_DISTRO") == "1"):
        pytest.skip("no cached Debian root (KLPFORGE_DISTRO=1 makes it with mmdebstrap, ~6 min)")
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed (scripts/apt-packages.txt)")
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "rootfs.tmp.tar"
    tmp.unlink(missing_ok=True)
    r = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp),
                        *_sources()], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    tmp.rename(tar)
    return tar


STEP = r"""#!/bin/sh
# one phase per boot (the phase number is kept on the disk)
M=$(cat /root/nonce); PKG=$(cat /root/pkg)
run() { n=$1; shift; echo "$M:BEGIN:$n"; "$@" 2>&1; rc=$?; echo "$M:RUN:$n:$rc"; }
dump() {
    echo "$M:DUMP:$1"
    for d in $(find /sys/kernel/livepatch -type d); do echo "$M:DIR:$d"; done
    for f in $(find /sys/kernel/livepatch -type f) /proc/modules /proc/sys/kernel/osrelease; do
        echo "$M:FILE:$f"; cat "$f" 2>/dev/null
    done
    for m in $(cut -d' ' -f1 /proc/modules); do echo "$M:FILE:/sys/module/$m/taint"; cat /sys/module/$m/taint; done
    echo "$M:DUMP-END"
}
phase=$(cat /root/phase)
main() {
if [ "$phase" = 1 ]; then
    run dpkg-i dpkg -i /root/klp.deb
    run sockstat cat /proc/net/sockstat
    echo 2 > /root/phase
elif [ "$phase" = 2 ]; then
    run unit systemctl is-active "$PKG.service"
    run journal journalctl -b --no-pager -o cat -u "$PKG.service"
    run sockstat-boot cat /proc/net/sockstat
    dump BOOT
    run other-release /usr/lib/$PKG/klpforge-load load /root/other-release.ko
    run missing-target /usr/lib/$PKG/klpforge-load load /root/nfsd.ko
    run dpkg-r dpkg -r "$PKG"
    run sockstat-removed cat /proc/net/sockstat
    dump REMOVED
    echo 3 > /root/phase
fi
echo "$M:DONE:$phase"
}
# The console is for watching only: a getty (or anything else) may hang up ttyS0 under this service, and its
# output is then lost. The copy on the disk is what the test reads (debugfs, after poweroff).
main 2>&1 | tee --output-error=warn /root/out.$phase
sync
systemctl --no-block poweroff
"""

UNIT = """[Unit]
Description=klpforge test step
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/step.sh
StandardOutput=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
"""


def test_deb_in_debian_with_systemd(debian_rootfs: Path, tmp_path: Path) -> None:
    from klpforge.util.proc import release, start

    ko = tmp_path / "livepatch-sockstat.ko"
    r = klpforge("build", "--distro", f"debian:{RELEASE}", str(ROOT / "tests/distro_patches/20-net-sockstat.patch"),
                 "-o", str(ko))
    assert r.returncode == 0, r.stderr[-3000:]
    nfsd = tmp_path / "livepatch-nfsd.ko"  # for a module the guest does not load
    r = klpforge("build", "--distro", f"debian:{RELEASE}",
                 str(ROOT / "tests/distro_patches/00-nfsd-sequence-cve.patch"), "-o", str(nfsd))
    assert r.returncode == 0, r.stderr[-3000:]
    data = ko.read_bytes()
    assert f"vermagic={RELEASE} ".encode() in data
    other = data.replace(f"vermagic={RELEASE} ".encode(), f"vermagic={OTHER} ".encode())
    r = klpforge("package", str(ko), "--format", "deb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    deb = tmp_path / r.stdout.strip()
    pkg = deb.name.split("_")[0]
    img = tmp_path / "img"
    img.mkdir()
    subprocess.run(["tar", "-C", str(img), "--numeric-owner", "-xpf", str(debian_rootfs)], check=True)
    nonce = "KLPD" + secrets.token_hex(6)
    (img / "root/step.sh").write_text(STEP)
    (img / "root/step.sh").chmod(0o755)
    for name, text in (("nonce", nonce), ("pkg", pkg), ("phase", "1")):
        (img / "root" / name).write_text(text + "\n")
    shutil.copy(deb, img / "root/klp.deb")
    shutil.copy(nfsd, img / "root/nfsd.ko")
    (img / "root/other-release.ko").write_bytes(other)
    (img / "etc/systemd/system/klpt-step.service").write_text(UNIT)
    wants = img / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "klpt-step.service").symlink_to("/etc/systemd/system/klpt-step.service")
    # no login prompt on the console the step writes to: agetty's vhangup() would cut the step's output
    (img / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    disk = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(img), str(disk), "2G"], check=True)
    boot = tmp_path / "boot"
    shutil.copytree(img / "boot", boot)
    shutil.rmtree(img)
    consoles = []
    for phase in (1, 2):
        log = tmp_path / f"console{phase}.log"
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "1024M", "-smp", "1", "-nodefaults",
               "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(boot / f"vmlinuz-{RELEASE}"),
               "-initrd", str(boot / f"initrd.img-{RELEASE}"), "-drive", f"file={disk},format=raw,if=virtio",
               "-append", "root=/dev/vda rw console=ttyS0 panic=-1 no_timer_check quiet"]
        with log.open("wb") as fh:
            q = start(cmd, stdout=fh, stderr=subprocess.STDOUT)
            try:
                q.wait(timeout=900)
            except subprocess.TimeoutExpired:
                pass
            finally:
                release(q)
        console = log.read_text(errors="replace")
        out = subprocess.run(["debugfs", "-R", f"cat /root/out.{phase}", str(disk)], capture_output=True,
                             text=True, errors="replace").stdout
        assert f"{nonce}:DONE:{phase}" in out, (out[-3000:], console[-3000:])
        consoles.append(out)
    _check(consoles, nonce, deb, tmp_path)


def _check(consoles: list[str], nonce: str, deb: Path, tmp_path: Path) -> None:
    """What the two boots reported."""
    pkg = deb.name.split("_")[0]
    one, _ = _parse_guest(consoles[0], nonce)
    two, dumps = _parse_guest(consoles[1], nonce)

    def ok(runs: dict[str, tuple[int, str]], name: str, *texts: str) -> str:
        rc, out = runs[name]
        assert rc == 0, (name, rc, out)
        for t in texts:
            assert t in out, (name, t, out)
        return out

    ok(one, "dpkg-i", f"Setting up {pkg} (1)", "livepatch_sockstat: transition OK")
    ok(one, "sockstat", "KLP: sockstat patched")
    ok(two, "unit", "active")
    ok(two, "journal", "klpforge-load: livepatch_sockstat: insmod OK", "livepatch_sockstat: transition OK")
    ok(two, "sockstat-boot", "KLP: sockstat patched")
    # refused with the reason, in the real system too
    assert two["other-release"][0] == 2
    assert f"livepatch_sockstat: refused: built for kernel {OTHER}, running {RELEASE}" in two["other-release"][1]
    assert two["missing-target"][0] == 2
    assert "livepatch_nfsd: refused: target module(s) not loaded: nfsd" in two["missing-target"][1]
    ok(two, "dpkg-r", f"Removing {pkg} (1)", "livepatch_sockstat: disable OK", "livepatch_sockstat: rmmod OK")
    assert "KLP: sockstat patched" not in ok(two, "sockstat-removed")
    x = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
    for phase, state in (("BOOT", "enabled"), ("REMOVED", None)):
        root = _rebuild(dumps[phase], nonce, tmp_path / f"guest-{phase}")
        if state:
            shutil.copytree(x, root, dirs_exist_ok=True)  # the package's files, as dpkg installed them
        r = klpforge("list", "--root", str(root), "--json")
        assert r.returncode == 0, r.stderr
        rows = {row["name"]: row for row in json.loads(r.stdout)}
        if state:
            assert rows["livepatch_sockstat"]["state"] == state
            assert rows["livepatch_sockstat"]["installed"] == "package"
            assert rows["livepatch_sockstat"]["release"] == RELEASE
            assert rows["livepatch_sockstat"]["objects"] == "vmlinux:patched"
        else:
            assert rows == {}
