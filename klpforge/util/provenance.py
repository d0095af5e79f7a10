"""What went into a live patch, recorded in its JSON report and its ``.modinfo``: klpforge's version, the
compiler, every patch file's SHA-256 and, for a distribution kernel, each Debian package's name, version and
SHA-256 -- so a shipped live patch can be traced back and rebuilt bit for bit.

Nothing in the record depends on when or where the build ran (no time, no temporary or absolute path:
patches are named by file name and hash), so two builds of one fix from the same inputs stay byte-identical
(``tests/test_trust.py`` builds twice and compares). ``modinfo -F klpforge_patch livepatch-fix.ko`` reads it
back on the host.

>>> rec = record([], "gcc (Debian 12.2.0-14) 12.2.0")
>>> [k for k, _ in modinfo(rec)]
['klpforge', 'klpforge_compiler']
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .fsutil import open_regular

__all__ = ["record", "modinfo", "file_sha256", "config_compiler", "debian_packages", "rehash_build_id"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a regular file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def config_compiler(config: Path) -> str:
    """``CONFIG_CC_VERSION_TEXT`` of a kernel ``.config`` (Linux >= 5.8 ``init/Kconfig``), "" without it."""
    try:
        m = re.search(r'^CONFIG_CC_VERSION_TEXT="([^"]*)"', config.read_text(errors="replace"), re.M)
    except OSError:
        return ""
    return m.group(1) if m else ""


def debian_packages(release_root: Path) -> list[dict[str, str]]:
    """The Debian packages a prepared release was made from (``<cache>/distro/debian/<release>/prepared.json``):
    role, package, version, file and SHA-256 (the stamp's when it records one, else hashed from ``debs/``);
    [] when there is no stamp (the plain form: no packages)."""
    try:
        stamp = json.loads((release_root / "prepared.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for role, entry in sorted((stamp.get("debs") or {}).items()):
        name = entry if isinstance(entry, str) else entry.get("file", "")
        sha = "" if isinstance(entry, str) else entry.get("sha256", "")
        pkg, _, rest = Path(name).name.partition("_")
        version = rest.rsplit("_", 1)[0].replace("%3a", ":")
        deb = release_root.parent / "debs" / Path(name).name
        if not sha and deb.is_file():
            sha = file_sha256(deb)
        out.append({"role": role, "package": pkg, "version": version, "file": Path(name).name, "sha256": sha})
    return out


def record(patches: Sequence[Path], compiler: str, packages: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The provenance record: ``{"klpforge": version, "compiler": text, "patches": [{"file", "sha256"}],
    "packages": [...]}`` (``packages`` only when given)."""
    rec: dict[str, Any] = {"klpforge": __version__, "compiler": compiler,
                           "patches": [{"file": Path(p).name, "sha256": file_sha256(p)} for p in patches]}
    if packages:
        rec["packages"] = list(packages)
    return rec


def modinfo(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """``MODULE_INFO`` (tag, value) pairs of a record, in a fixed order: ``klpforge``, ``klpforge_compiler``,
    one ``klpforge_patch`` (``sha256:HEX FILE``) per patch and one ``klpforge_package``
    (``NAME=VERSION sha256:HEX``) per package."""
    out = [("klpforge", str(rec["klpforge"]))]
    if rec.get("compiler"):
        out.append(("klpforge_compiler", rec["compiler"]))
    out += [("klpforge_patch", f"sha256:{p['sha256']} {p['file']}") for p in rec.get("patches", [])]
    out += [("klpforge_package", f"{p['package']}={p['version']} sha256:{p['sha256']}")
            for p in rec.get("packages", [])]
    return out


def rehash_build_id(data: bytes) -> bytes:
    """``data`` (an ELF file) with its ``NT_GNU_BUILD_ID`` set to the SHA-1 of the file with that ID zeroed:
    the ID ``ld --build-id=sha1`` computed at the module link also hashed what the post-link step rewrites
    (the temporary paths of the objects' symbols), so two builds of identical modules differed in it alone.
    The ID then names exactly the bytes shipped. Returns ``data`` unchanged without such a note.

    >>> rehash_build_id(b"not an ELF") == b"not an ELF"
    True
    """
    import io
    import struct

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        sec = elf.get_section_by_name(".note.gnu.build-id")
    except ELFError:
        return data
    if sec is None:
        return data
    off = sec["sh_offset"]
    end = "<" if elf.little_endian else ">"
    namesz, descsz, ntype = struct.unpack(end + "III", data[off:off + 12])
    if ntype != 3 or descsz == 0:  # NT_GNU_BUILD_ID
        return data
    desc = off + 12 + ((namesz + 3) & ~3)
    buf = bytearray(data)
    buf[desc:desc + descsz] = bytes(descsz)
    digest = hashlib.sha1(bytes(buf)).digest()  # noqa: S324 - an identifier, as ld's sha1 style
    buf[desc:desc + descsz] = (digest * (descsz // len(digest) + 1))[:descsz]
    return bytes(buf)
