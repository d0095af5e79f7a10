"""Build a busybox initramfs with the kernel's own ``usr/gen_init_cpio`` (no root needed).

>>> build_initramfs(Path("build/usr/gen_init_cpio"), Path("/tmp/i.cpio"),
...                 "#!/bin/sh\\necho hi\\n", {"/lib/klp/x.ko": Path("x.ko")})   # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..util.errors import InputError

__all__ = ["build_initramfs", "cpio_list"]

BUSYBOX = Path("/bin/busybox")

# Applets the init scripts use; each becomes a symlink to busybox.
_APPLETS = ("sh", "mount", "insmod", "rmmod", "lsmod", "cat", "echo", "sleep", "dmesg", "reboot", "grep",
            "ls", "test", "mkdir", "seq", "tr", "head", "wc", "uname")


def cpio_list(init_path: Path, files: Mapping[str, Path]) -> str:
    """The ``gen_init_cpio`` list: directories, ``/dev/console`` (6.1 opens it for init's stdio),
    busybox + applets, ``/init`` and each extra file (guest path -> host path).

    >>> "nod /dev/console 600 0 0 c 5 1" in cpio_list(Path("/tmp/init"), {})
    True
    """
    lines = [
        "dir /dev 755 0 0",
        "nod /dev/console 600 0 0 c 5 1",
        "nod /dev/null 666 0 0 c 1 3",
        "dir /proc 755 0 0",
        "dir /sys 755 0 0",
        "dir /tmp 1777 0 0",
        "dir /bin 755 0 0",
        "dir /lib 755 0 0",
        "dir /lib/klp 755 0 0",
        f"file /bin/busybox {BUSYBOX} 755 0 0",
    ]
    lines += [f"slink /bin/{a} busybox 777 0 0" for a in _APPLETS]
    lines.append(f"file /init {init_path} 755 0 0")
    dirs = {"/dev", "/proc", "/sys", "/tmp", "/bin", "/lib", "/lib/klp"}
    for guest, host in files.items():
        parent = os.path.dirname(guest)
        parts = [p for p in parent.split("/") if p]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            if d not in dirs:
                dirs.add(d)
                lines.append(f"dir {d} 755 0 0")
        if any(c.isspace() for c in guest + str(host)):
            raise InputError(f"initramfs paths may not contain spaces: {guest} <- {host}")
        lines.append(f"file {guest} {Path(host).resolve()} 644 0 0")
    return "\n".join(lines) + "\n"


def build_initramfs(gen_init_cpio: Path, out: Path, init_script: str, files: Mapping[str, Path]) -> Path:
    """Write an uncompressed newc cpio at ``out`` (atomically) holding busybox, ``init_script`` as
    ``/init`` and ``files``; returns ``out``."""
    if not gen_init_cpio.is_file():
        raise InputError(f"{gen_init_cpio} not found: is the kernel built with CONFIG_BLK_DEV_INITRD?")
    if not BUSYBOX.is_file():
        raise InputError(f"{BUSYBOX} not found: install Debian's busybox-static package")
    for host in files.values():
        if not Path(host).is_file():
            raise InputError(f"{host}: no such file")
    with tempfile.TemporaryDirectory(prefix="klpforge-initramfs-") as td:
        init = Path(td) / "init"
        init.write_text(init_script)
        lst = Path(td) / "list"
        lst.write_text(cpio_list(init, files))
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                r = subprocess.run([str(gen_init_cpio), str(lst)], stdout=f,
                                   stderr=subprocess.PIPE, check=False)
            if r.returncode != 0:
                raise InputError(f"gen_init_cpio failed: {r.stderr.decode(errors='replace').strip()}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
