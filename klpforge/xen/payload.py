"""Link payload parts into one Xen livepatch payload with its notes.

Xen 4.17 (``xen/common/livepatch.c: check_special_sections``) requires, once each and non-empty:
``.livepatch.depends`` (build-id of what the payload applies on top of: the hypervisor for the first
payload), ``.livepatch.xen_depends`` (the hypervisor's build-id, checked at upload) and the payload's own
``.note.gnu.build-id``. The parts are joined with ``ld -r --build-id=sha1``, as livepatch-build-tools does:
ld concatenates same-named sections (``.livepatch.funcs``, the special tables) and computes the note.

>>> link_payload([Path("part0.o")], Path("fix.livepatch"), depends=bid, xen_depends=bid)  # doctest: +SKIP
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from ..elf import ObjectWriter
from ..elf import constants as C
from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import run

__all__ = ["note", "notes_object", "link_payload"]

_NT_GNU_BUILD_ID = 3


def note(desc: bytes, name: bytes = b"GNU", ntype: int = _NT_GNU_BUILD_ID) -> bytes:
    """One ELF note (4-byte aligned fields), as ``xen_build_id_check`` parses it.

    >>> note(b"\\x01\\x02").hex()
    '040000000200000003000000474e550001020000'
    """
    n = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def notes_object(depends: bytes, xen_depends: bytes) -> bytes:
    """An x86_64 ``ET_REL`` holding the two dependency notes."""
    w = ObjectWriter(64, "<", C.EM_X86_64)
    for name, desc in ((".livepatch.depends", depends), (".livepatch.xen_depends", xen_depends)):
        h = w.add_section(name, C.SHT_NOTE, C.SHF_ALLOC, note(desc), addralign=4)
        w.add_symbol("", h, 0, 0, C.STT_SECTION, C.STB_LOCAL)
    return w.build()


def link_payload(parts: list[Path], out: Path, depends: bytes, xen_depends: bytes) -> None:
    """``ld -r --build-id=sha1`` the parts and the notes into ``out`` (atomically).

    Raises :class:`InputError` if ld fails (its message is kept)."""
    with tempfile.TemporaryDirectory(prefix="klpforge-xenlink-") as td:
        notes = Path(td) / "notes.o"
        notes.write_bytes(notes_object(depends, xen_depends))
        tmp = Path(td) / "payload.o"
        r = run(["ld", "-r", "--build-id=sha1", "-z", "noexecstack", "-o", str(tmp),
                 *map(str, parts), str(notes)], capture_output=True, text=True)
        if r.returncode != 0:
            raise InputError(f"linking the payload failed: {r.stderr.strip()[:400]}")
        atomic_write(out, tmp.read_bytes(), mode=0o644)
