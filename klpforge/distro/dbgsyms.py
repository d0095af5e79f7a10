"""The full vmlinux symbol table of a Debian release, from its ``-dbg`` package, fetched on demand.

A ``/proc/kallsyms`` capture (:mod:`klpforge.distro.symbols`) has no FILE symbols, so a static whose name
exists several times in vmlinux (``session_id`` of 6.1 ``kernel/audit.c``) cannot always be placed
(:class:`klpforge.diff.symtab.AmbiguousSymbol`). ``linux-image-<release>-dbg`` holds the unstripped vmlinux
(``usr/lib/debug/boot/vmlinux-<release>``: FILE symbols, same addresses as the shipped image). It is
858 MB for 6.1.0-56-amd64, so it is fetched only when a build needs it: the ``.deb`` is verified against
the signed index (:meth:`klpforge.distro.apt.AptRoot.fetch`), only vmlinux is read out of it, and only its
``readelf -sW`` text (about 30 MB) is kept in the release's cache directory; the ``.deb`` and the vmlinux
are removed.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import run
from .apt import apt_root, disk_full_message
from .base import Say

__all__ = ["DBG_SYMBOLS", "dbg_symbols"]

#: File name of the kept symbol table in the release's cache directory.
DBG_SYMBOLS = "vmlinux-dbg.readelf"


def dbg_symbols(release: str, where: Path, version: str, say: Say,
                cache: str | None = None) -> Path:
    """``readelf -sW`` text of the ``-dbg`` vmlinux of Debian ``release`` (package version ``version``,
    the image's), made once into ``where`` (the release's cache directory). Raises InputError when apt has
    no such package or the package holds no vmlinux."""
    out = where / DBG_SYMBOLS
    if out.is_file() and out.stat().st_size:
        return out
    pkg = f"linux-image-{release}-dbg"
    apt = apt_root(cache)
    have = [v for v, _ in apt.versions(pkg, say)]
    if version not in have:
        raise InputError(f"the Debian archive has no {pkg}={version} (needed to place a static that vmlinux "
                         f"has several times){'; it has ' + ', '.join(have) if have else ''}")
    rec = apt.record(pkg, version, say)
    with tempfile.TemporaryDirectory(prefix="klpforge-dbg-", dir=where) as tmp:
        say(f"fetching {pkg} ({rec.size // 1_000_000} MB) for the full vmlinux symbol table")
        deb = apt.fetch(rec, Path(tmp), say)
        vml = Path(tmp) / "vmlinux"
        member = f"./usr/lib/debug/boot/vmlinux-{release}"
        # only the one member is read out of the (xz) data archive: tar stops after its first occurrence
        cmd = (f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -xOf - --occurrence=1 "
               f"{shlex.quote(member)} > {shlex.quote(str(vml))}")
        r = run(cmd, shell=True, capture_output=True, text=True)
        if r.returncode != 0 or not vml.is_file() or not vml.stat().st_size:
            if "No space left on device" in r.stderr:
                raise InputError(disk_full_message(where, f"reading vmlinux out of {deb.name}"))
            raise InputError(f"{deb.name} holds no {member[2:]}: {r.stderr.strip()[:200]}")
        deb.unlink()
        r = run(["readelf", "-sW", str(vml)], capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout:
            raise InputError(f"readelf -sW of {pkg}'s vmlinux failed: {r.stderr.strip()[:200]}")
        atomic_write(out, r.stdout)
    return out
