"""Read a kernel module's ``.modinfo`` (``key=value`` NUL-separated strings).

>>> modinfo(Path("livepatch-sample.ko"))["livepatch"]   # doctest: +SKIP
'Y'
"""

from __future__ import annotations

from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..util.errors import InputError

__all__ = ["modinfo", "module_name", "livepatch_sysfs_name"]


def modinfo(ko: Path) -> dict[str, str]:
    """``.modinfo`` of ``ko`` as a dict (the last value wins for repeated keys such as ``alias``)."""
    try:
        with ko.open("rb") as f:
            elf = ELFFile(f)
            sec = elf.get_section_by_name(".modinfo")
            data = sec.data() if sec is not None else b""
    except (OSError, ELFError) as e:
        raise InputError(f"{ko}: not a readable kernel module ({e})") from None
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            out[k] = v
    return out


def module_name(ko: Path) -> str:
    """Name the kernel gives the module: ``name=`` from modinfo, else the file stem with ``-`` -> ``_``.

    >>> module_name(Path("/x/livepatch-fix.ko"))   # doctest: +SKIP
    'livepatch_fix'
    """
    try:
        name = modinfo(ko).get("name")
    except InputError:
        name = None
    return name or ko.name.removesuffix(".ko").replace("-", "_")


def livepatch_sysfs_name(ko: Path) -> str:
    """Directory name under ``/sys/kernel/livepatch`` (Linux 6.1 uses ``mod->name``)."""
    return module_name(ko)
