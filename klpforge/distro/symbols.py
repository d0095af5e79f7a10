"""Symbols of the shipped binaries: the modules (``.ko`` symbol tables) and vmlinux (a ``/proc/kallsyms``
capture, since Debian's ``System.map`` is a stub and the ``-dbg`` vmlinux is 858 MB).

The capture boots the shipped ``vmlinuz`` once under QEMU (``nokaslr``, ``kptr_restrict=0``) with a busybox
initramfs that prints ``/proc/kallsyms`` between markers; it is cached per release. For the diff it is
turned into ``readelf -s --wide`` text (:class:`klpforge.diff.symtab.TargetSymtab` reads that): ``t``/``T`` become
``FUNC``, lower case ``LOCAL``; sizes are the gap to the next symbol.

>>> kallsyms_to_readelf("ffffffff81000000 T _stext\\nffffffff81000010 t foo\\n").splitlines()[2].split()[1:5]
['ffffffff81000000', '16', 'FUNC', 'GLOBAL']
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..elf import ElfFile
from ..elf import constants as C
from ..qemu.initramfs import build_initramfs
from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import run
from .base import Say

__all__ = ["module_index", "kallsyms_to_readelf", "capture_kallsyms", "shipped_sizes"]


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Module name (``-`` -> ``_``) -> shipped ``.ko`` under ``lib/modules/<release>/kernel`` (or any
    directory of ``.ko`` files)."""
    out: dict[str, Path] = {}
    root = modules_dir / "kernel" if (modules_dir / "kernel").is_dir() else modules_dir
    for p in sorted(root.rglob("*.ko*")):
        name = p.name.split(".ko", 1)[0].replace("-", "_")
        out.setdefault(name, p)
    return out


def shipped_sizes(path: Path, is_module: bool = True) -> dict[str, list[tuple[int, bool]]]:
    """``name -> [(size, exact), ...]`` in sympos order (symbol-table order in a module, address order in
    vmlinux, as Linux 6.1 ``klp_find_object_symbol`` counts) for the functions of a shipped binary: ``st_size``
    of an ELF file (a module, a ``-dbg`` vmlinux) or of ``readelf -sW`` text (exact), or the gaps of a kallsyms
    capture (an upper bound)."""
    if path.suffix in (".xz", ".zst", ".gz"):
        raise InputError(f"{path}: compressed modules are not supported yet (decompress it first)")
    with path.open("rb") as fh:
        head = fh.read(4)
    rows: list[tuple[int, int, str, int]] = []  # (address, index, name, size)
    exact = True
    if head != b"\x7fELF":
        text = path.read_text(errors="replace")
        exact = not text.startswith("Symbol table '.kallsyms'")
        for lineno, line in enumerate(text.splitlines()):
            f = line.split()
            if len(f) >= 8 and f[3] == "FUNC" and f[0].endswith(":") and f[2].isdigit() and f[6] != "UND":
                rows.append((int(f[1], 16), lineno, f[7], int(f[2])))
    else:
        elf = ElfFile.open(path)
        for i, sname in enumerate(elf.sym_names):
            if sname and int(elf.syms["info"][i]) & 0xF == C.STT_FUNC and int(elf.syms["shndx"][i]) != 0:
                rows.append((int(elf.syms["value"][i]), i, sname, int(elf.syms["size"][i])))
    rows.sort(key=(lambda r: r[1]) if is_module else (lambda r: (r[0], r[1])))
    out: dict[str, list[tuple[int, bool]]] = {}
    for _addr, _i, name, size in rows:
        out.setdefault(name, []).append((size, exact))
    return out


_TYPES = {"t": "FUNC", "w": "FUNC", "d": "OBJECT", "b": "OBJECT", "r": "OBJECT", "v": "OBJECT", "a": "NOTYPE"}


def _parse_kallsyms(text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or len(parts) > 3:  # a 4th column "[module]": not vmlinux
            continue
        try:
            rows.append((int(parts[0], 16), parts[1], parts[2]))
        except ValueError:
            continue
    rows.sort(key=lambda r: r[0])
    return rows


def kallsyms_to_readelf(text: str) -> str:
    """``/proc/kallsyms`` text (vmlinux part) as ``readelf -s --wide`` lines, address order."""
    rows = _parse_kallsyms(text)
    out = [f"Symbol table '.kallsyms' contains {len(rows)} entries:",
           "   Num:    Value          Size Type    Bind   Vis      Ndx Name"]
    for i, (addr, t, name) in enumerate(rows):
        nxt = rows[i + 1][0] if i + 1 < len(rows) else addr
        typ = _TYPES.get(t.lower(), "NOTYPE")
        bind = "LOCAL" if t.islower() else "GLOBAL"
        out.append(f"{i:6d}: {addr:016x} {nxt - addr:5d} {typ:<7} {bind:<6} DEFAULT    1 {name}")
    return "\n".join(out) + "\n"


def capture_kallsyms(vmlinuz: Path, gen_init_cpio: Path, out: Path, say: Say, timeout: float = 300) -> Path:
    """Boot ``vmlinuz`` under QEMU, print ``/proc/kallsyms``, write it as readelf text to ``out``."""
    if out.is_file():
        return out
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise InputError("qemu-system-x86_64 not found: install Debian's qemu-system-x86 package")
    nonce = "KLPK" + secrets.token_hex(6)
    init = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo 0 > /proc/sys/kernel/kptr_restrict
echo 1 > /proc/sys/kernel/printk
echo {nonce}:BEGIN
cat /proc/kallsyms
echo {nonce}:END
reboot -f
"""
    say(f"capturing vmlinux symbols: booting {vmlinuz.name} once under QEMU")
    with tempfile.TemporaryDirectory(prefix="klpforge-kallsyms-") as td:
        initrd = build_initramfs(gen_init_cpio, Path(td) / "initramfs.cpio", init, {})
        cmd = [qemu, "-accel", "tcg", "-m", "512M", "-smp", "1", "-nodefaults", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 nokaslr quiet loglevel=1"]
        try:
            r = run(cmd, capture_output=True, timeout=timeout)  # klpforge.util.proc: QEMU never outlives klpforge
        except subprocess.TimeoutExpired:
            raise InputError(f"booting {vmlinuz} to read /proc/kallsyms timed out after {timeout:.0f} s") from None
    text = r.stdout.decode(errors="replace").replace("\r", "")
    if f"{nonce}:END" not in text:
        raise InputError(f"{vmlinuz}: the guest printed no complete /proc/kallsyms (did it boot?)")
    body = text.split(f"{nonce}:BEGIN\n", 1)[1].split(f"{nonce}:END", 1)[0]
    conv = kallsyms_to_readelf(body)
    if sum(1 for r in _parse_kallsyms(body) if r[0]) < 1000:
        raise InputError(f"{vmlinuz}: /proc/kallsyms capture is empty or hides addresses")
    atomic_write(out, conv)
    return out
