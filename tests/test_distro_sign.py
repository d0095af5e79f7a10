"""Signed live patches (issue 15): ``--sign-key/--sign-cert`` sign with the kernel's own ``sign-file``; a kernel
that enforces module signatures loads the signed live patch and refuses the unsigned one.

The enforcing kernel is the 6.1 test kernel's configuration plus ``CONFIG_MODULE_SIG_FORCE`` (a copy of the test
kernel's build directory under ``<cache>/kernel-6.1-sig``, rebuilt once for the changed options): its build generates
``certs/signing_key.pem`` and trusts it (builtin keyring), which is our test key. The live patch is built with
the plain form against that build directory (``-s SRC -O BUILD --headers BUILD``), whose ``scripts/sign-file``
is the kernel's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klpforge.distro.sign import SIG_MAGIC
from klpforge.kbuild.prepare import KernelLayout, check_config, fragment_lines, merge_fragment
from klpforge.kbuild.testkernel import prepared_kernel, require_kernel
from klpforge.util.fsutil import cache_root

pytestmark = [pytest.mark.kernel]

PATCH = Path(__file__).parent / "kernel_patches" / "00-cmdline-noreloc.patch"

#: On top of the test kernel's config: signatures checked and required (Linux 6.1 ``kernel/module/Kconfig``).
SIG_FRAGMENT = """\
CONFIG_MODULE_SIG=y
CONFIG_MODULE_SIG_FORCE=y
CONFIG_MODULE_SIG_SHA256=y
CONFIG_MODULE_SIG_KEY="certs/signing_key.pem"
CONFIG_SYSTEM_TRUSTED_KEYRING=y
"""


def klpforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def sig_build() -> tuple[KernelLayout, Path]:
    """The signature-enforcing variant of the test kernel, built once into the cache."""
    lay = prepared_kernel()
    if lay is None:
        if require_kernel():
            pytest.fail("the test kernel is not prepared (klpforge kernel prepare)")
        pytest.skip("the test kernel is not prepared (klpforge kernel prepare)")
    root = cache_root() / "kernel-6.1-sig"
    build = root / "build"
    stamp = root / "built.json"
    key = {"base": json.loads(lay.stamp.read_text()).get("key"), "fragment": SIG_FRAGMENT, "copy": 1}
    try:
        if json.loads(stamp.read_text()) == key and (build / "arch/x86/boot/bzImage").is_file():
            return lay, build
    except (OSError, ValueError):
        pass
    # a copy of the test kernel's build: Kbuild's per-option dependencies (include/config/*) rebuild only what
    # uses the changed options (module loading, certs, sign-file) and relink: minutes, not a full build
    made = root / "copied.json"  # the copy is reused by an interrupted run (make is incremental)
    if not made.is_file() or json.loads(made.read_text()) != key:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(lay.build), str(build)], check=True)
        made.write_text(json.dumps(key))
    log = root / "build.log"
    make = ["make", "-C", str(lay.src), f"O={build}", "ARCH=x86_64"]
    cfg = build / ".config"
    cfg.write_text(merge_fragment((lay.build / ".config").read_text(), fragment_lines(SIG_FRAGMENT)))
    t0 = time.monotonic()
    with log.open("w") as f:
        for args in (["olddefconfig"], ["-j2"]):
            r = subprocess.run([*make, *args], stdout=f, stderr=subprocess.STDOUT, check=False)
            assert r.returncode == 0, f"building the signing kernel failed; see {log}"
    assert not check_config(cfg.read_text(), fragment_lines(SIG_FRAGMENT))
    stamp.write_text(json.dumps(key))
    print(f"signature-enforcing kernel built in {time.monotonic() - t0:.0f}s")
    return lay, build


def _build(lay: KernelLayout, build: Path, out: Path, *sign: str) -> subprocess.CompletedProcess[str]:
    return klpforge("build", "-s", str(lay.src), "-O", str(build), "--headers", str(build),
                    "--symbols", str(build / "vmlinux"), "--symvers", str(build / "Module.symvers"),
                    str(PATCH), "-o", str(out), *sign)


def _verify(build: Path, ko: Path) -> subprocess.CompletedProcess[str]:
    return klpforge("verify", str(ko), "--kernel", str(build / "arch/x86/boot/bzImage"),
                    "--gen-init-cpio", str(build / "usr/gen_init_cpio"),
                    "--check", "cat /proc/cmdline", "--expect", "klpforge: no relocation", "--timeout", "300")


def test_signed_loads_unsigned_refused(sig_build: tuple[KernelLayout, Path], tmp_path: Path) -> None:
    lay, build = sig_build
    certs = build / "certs"
    signed = tmp_path / "livepatch-signed.ko"
    r = _build(lay, build, signed, "--sign-key", str(certs / "signing_key.pem"),
               "--sign-cert", str(certs / "signing_key.x509"))
    assert r.returncode == 0, r.stderr
    assert signed.read_bytes().endswith(SIG_MAGIC)
    assert ", signed" in r.stderr
    info = subprocess.run(["modinfo", "-F", "signer", str(signed)], capture_output=True, text=True, check=False)
    assert info.stdout.strip(), "modinfo shows no signer"
    v = _verify(build, signed)
    assert v.returncode == 0, v.stderr[-2000:]

    unsigned = tmp_path / "livepatch-unsigned.ko"
    r = _build(lay, build, unsigned)
    assert r.returncode == 0, r.stderr
    assert not unsigned.read_bytes().endswith(SIG_MAGIC)
    v = _verify(build, unsigned)
    assert v.returncode == 1
    # Linux 6.1 module_sig_check(): no signature under sig_enforce is -EKEYREJECTED
    assert "insmod      FAIL" in v.stderr and "Key was rejected by service" in v.stderr, v.stderr[-2000:]


def test_sign_flags_refused_alone(sig_build: tuple[KernelLayout, Path], tmp_path: Path) -> None:
    lay, build = sig_build
    out = tmp_path / "x.ko"
    r = _build(lay, build, out, "--sign-key", str(build / "certs/signing_key.pem"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--sign-key and --sign-cert go together (the private key and its X.509 certificate)")
    assert not out.exists()
    r = _build(lay, build, out, "--sign-key", str(tmp_path / "none.pem"), "--sign-cert", str(tmp_path / "c"))
    assert r.returncode == 1 and f"--sign-key {tmp_path / 'none.pem'}: not a readable file" in r.stderr
    assert not out.exists() and "Traceback" not in r.stderr
