"""The last step of a distribution live patch: sign it with the kernel's own ``sign-file``, compress it as
the distribution installs modules, write it.

Signing (``--sign-key KEY --sign-cert CERT``): ``scripts/sign-file <CONFIG_MODULE_SIG_HASH> KEY CERT
module.ko`` from the headers' kbuild package (Debian: ``linux-kbuild-*``; built against that release's
OpenSSL, so it runs in the release's build root, :mod:`.roots`). The kernel checks the appended PKCS#7
signature against its builtin, secondary, machine (MOK) and platform keyrings (Linux 6.12
``kernel/module/signing.c``). A kernel with ``CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT`` booted under Secure Boot
refuses unsigned modules, so an unsigned live patch for it gets a one-line warning.

Compression: with ``-o NAME.ko.xz`` (``.ko.zst``, ``.ko.gz``) the signed module is compressed as
``make modules_install`` does (signature inside, compression outside: 6.12 ``scripts/Makefile.modinst``
signs, then compresses). A plain ``.ko`` for a kernel that installs compressed modules gets a note: kmod's
``insmod``/``modprobe`` load both forms.

>>> _config_value("CONFIG_MODULE_SIG_HASH=\\"sha256\\"\\n", "CONFIG_MODULE_SIG_HASH")
'sha256'
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from .base import DistroTree
from .modules import COMPRESSED, compress_module
from .roots import in_root

__all__ = ["finish_module", "sign_module", "check_sign_args", "SIG_MAGIC"]

#: The trailer ``sign-file`` appends (Linux ``include/linux/module_signature.h``, ``MODULE_SIG_STRING``).
SIG_MAGIC = b"~Module signature appended~\n"


def _config_value(text: str, key: str) -> str | None:
    m = re.search(rf"^{key}=(.*)$", text, re.M)
    return m.group(1).strip().strip('"') if m else None


def check_sign_args(key: Path | None, cert: Path | None) -> None:
    """Refuse (one line) a key without its certificate or the reverse, and unreadable files: before any work."""
    if (key is None) != (cert is None):
        raise InputError("--sign-key and --sign-cert go together (the private key and its X.509 certificate)")
    for what, p in (("--sign-key", key), ("--sign-cert", cert)):
        if p is not None and not p.is_file():
            raise InputError(f"{what} {p}: not a readable file")


def sign_module(tree: DistroTree, ko: Path, key: Path, cert: Path, log: Path) -> None:
    """Sign ``ko`` in place with the release's ``sign-file``; raises :class:`InputError` (no sign-file,
    unreadable key, sign-file failure)."""
    for what, p in (("--sign-key", key), ("--sign-cert", cert)):
        if not p.is_file():
            raise InputError(f"{what} {p}: not a readable file")
    base = tree.headers or tree.build
    sign_file = (base / "scripts" / "sign-file")
    if not sign_file.is_file():
        raise InputError(f"{sign_file}: missing, cannot sign (the kernel's kbuild package ships it; "
                         "is CONFIG_MODULE_SIG set?)")
    config = tree.config.read_text(errors="replace")
    algo = _config_value(config, "CONFIG_MODULE_SIG_HASH") or "sha256"
    # key and certificate next to the module: the only places the build root sees are the tree and /tmp
    work = ko.parent
    k, c = work / "signing_key.pem", work / "signing_cert"
    shutil.copyfile(key, k)
    k.chmod(0o600)
    shutil.copyfile(cert, c)
    cmd = in_root(tree, [str(sign_file.resolve()), algo, str(k), str(c), str(ko)])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        k.unlink(missing_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    if r.returncode != 0 or not ko.read_bytes().endswith(SIG_MAGIC):
        err = (r.stderr or r.stdout).strip().splitlines()
        raise InputError(f"sign-file failed: {err[-1] if err else f'exit {r.returncode}'}")


def finish_module(tree: DistroTree, ko: Path, output: Path, key: Path | None, cert: Path | None,
                  log: Path) -> tuple[bool, list[str]]:
    """Sign (when asked), compress (for an ``output`` named ``.ko.xz``/``.ko.zst``/``.ko.gz``) and write
    ``output`` atomically. Returns ``(signed, notes)``: notes are one-line warnings for the user."""
    check_sign_args(key, cert)
    config = tree.config.read_text(errors="replace") if tree.config.is_file() else ""
    notes: list[str] = []
    signed = False
    if key is not None and cert is not None:
        if _config_value(config, "CONFIG_MODULE_SIG") != "y":
            notes.append(f"note: {tree.release} has no CONFIG_MODULE_SIG: it ignores the signature")
        sign_module(tree, ko, key, cert, log)
        signed = True
    elif _config_value(config, "CONFIG_MODULE_SIG") == "y" and \
            _config_value(config, "CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT") == "y":
        notes.append(f"warning: {output.name} is unsigned: on a machine booted with UEFI Secure Boot {tree.release} "
                     "refuses it (lockdown); sign it with --sign-key/--sign-cert and enrol the certificate with "
                     "mokutil (docs/distro.md)")
    suffix = output.suffix if output.suffix in COMPRESSED and output.name[: -len(output.suffix)].endswith(".ko") \
        else ""
    if suffix:
        atomic_write(output, compress_module(ko, suffix))
    else:
        atomic_write(output, ko.read_bytes())
        for alg, ext in (("XZ", ".xz"), ("ZSTD", ".zst"), ("GZIP", ".gz")):
            if _config_value(config, f"CONFIG_MODULE_COMPRESS_{alg}") == "y" and \
                    _config_value(config, "CONFIG_MODULE_COMPRESS_ALL") == "y":
                notes.append(f"note: {tree.release} installs its modules as .ko{ext}; {output.name} is written "
                             f"uncompressed (insmod and modprobe load both); name it {output.name}{ext} for the "
                             "distribution's form")
    return signed, notes
