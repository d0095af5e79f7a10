"""Find and parse GCC ``-fdump-ipa-clones`` dumps into numpy record tables.

Both record layouts are read (see ``docs/impact.md``)::

    Callgraph clone;ORIG;ORDER;FILE;LINE;COL;NEW;ORDER;FILE;LINE;COL;KIND           (GCC >= 7.1, 12 fields)
    Callgraph clone;ORIG;ORDER;FILE;LINE;COL;<-;NEW;ORDER;FILE;LINE;COL;optimization:;KIND   (older, 14)
    Callgraph removal;NAME;ORDER;FILE;LINE;COL                                        (6 fields)

``ORDER`` is read but never used to identify a function: it differs between translation units.

>>> from pathlib import Path
>>> d = parse_dumps([Path("tests/ipa_data/inline.c")]) # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .tokens import FieldTooLong, hash_strings, split_fields

__all__ = ["DUMP_SUFFIX", "RawDumps", "find_dumps", "parse_dumps", "object_for_dump", "lto_link_of"]

DUMP_SUFFIX = ".ipa-clones"
_LTO_RE = re.compile(r"^(?P<link>.+)\.(?:wpa|ltrans\d+\.ltrans)\.\d+i\.ipa-clones$")
_H_CLONE, _H_REMOVAL, _H_ARROW, _H_OPT = (int(h) for h in hash_strings(
    ["Callgraph clone", "Callgraph removal", "<-", "optimization:"]))


@dataclass
class RawDumps:
    """Records of a set of dumps, one row per record; strings are field hashes into ``data``.

    ``clone_*`` columns: ``o``/``n`` = original/new function, each with name, file, line, col hashes
    and the byte offset of each field in ``data`` (to decode one representative per distinct value).
    """

    paths: list[Path]
    data: bytearray
    file_start: np.ndarray  # byte offset of each dump in data
    c_dump: np.ndarray  # dump index per clone record
    c_hash: np.ndarray  # (n, 9) uint64: oname ofile oline ocol nname nfile nline ncol kind
    c_off: np.ndarray  # (n, 9) int64 offsets of those fields
    c_len: np.ndarray  # (n, 9) int32 lengths
    r_dump: np.ndarray
    r_hash: np.ndarray  # (m, 4) name file line col
    r_off: np.ndarray
    r_len: np.ndarray

    def locate(self, offset: int) -> str:
        """``path:line`` of a byte offset in ``data``."""
        i = int(np.searchsorted(self.file_start, offset, side="right")) - 1
        line = self.data.count(b"\n", int(self.file_start[i]), offset) + 1
        return f"{self.paths[i]}:{line}"


def find_dumps(spec: str | os.PathLike[str]) -> list[Path]:
    """Dumps named by ``spec``: a directory (searched recursively), one dump, or a text file listing dumps.

    >>> find_dumps("tests/ipa_data")  # doctest: +SKIP
    []
    """
    p = Path(spec)
    if p.is_dir():
        found: list[Path] = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            found.extend(Path(root, f) for f in sorted(files) if f.endswith(DUMP_SUFFIX))
        return found
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.name.endswith(DUMP_SUFFIX):
        return [p]
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read list of dumps: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        q = Path(name) if os.path.isabs(name) else p.parent / name
        if not q.is_file():
            if n == 1 and name.startswith("Callgraph "):
                raise InputError(f"{p}:1: this is a dump, not a list of dumps: name it *{DUMP_SUFFIX}")
            raise InputError(f"{p}:{n}: listed dump {name!r} does not exist")
        out.append(q)
    return out


def lto_link_of(dump: Path) -> Path | None:
    """The linked output an LTO link-time dump belongs to, or None for a compile-time dump.

    >>> lto_link_of(Path("out/prog.ltrans0.ltrans.000i.ipa-clones"))
    PosixPath('out/prog')
    """
    m = _LTO_RE.match(dump.name)
    return dump.with_name(m.group("link")) if m else None


def object_for_dump(dump: Path, objects: Path | None = None, dumps_root: Path | None = None) -> Path | None:
    """The symbol table belonging to ``dump``: ``X.o.syms`` or ``X.o`` beside it, or the same relative path
    under ``objects``; for LTO link dumps, the linked output. None when there is none.

    >>> object_for_dump(Path("/nonexistent/x.c.000i.ipa-clones")) is None
    True
    """
    link = lto_link_of(dump)
    if link is not None:
        cands = [link]
    else:
        stem = re.sub(r"\.\d+i\.ipa-clones$", "", dump.name)
        base = os.path.splitext(stem)[0]
        cands = [dump.with_name(base + ".o.syms"), dump.with_name(base + ".o")]
    if objects is not None:
        rel = dump.parent.relative_to(dumps_root) if dumps_root and dump.is_relative_to(dumps_root) else Path()
        cands += [objects / rel / c.name for c in cands] + [objects / c.name for c in cands]
    for c in cands:
        if c.is_file():
            return c
    return None


# clone record field numbers (12-field layout) of: oname ofile oline ocol nname nfile nline ncol kind
_COLS12 = np.array([1, 3, 4, 5, 6, 8, 9, 10, 11])
_COLS14 = np.array([1, 3, 4, 5, 7, 9, 10, 11, 13])
_COLSRM = np.array([1, 3, 4, 5])


def parse_dumps(paths: list[Path]) -> RawDumps:
    """Read and split every dump; raise :class:`InputError` naming file and line for anything malformed."""
    sizes = []
    for p in paths:
        try:
            sizes.append(p.stat().st_size)
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror}") from None
    # one buffer for all dumps, filled in place: no second copy of ~60 MB
    data = bytearray(sum(sizes) + len(paths))
    view = memoryview(data)
    starts = []
    pos = 0
    for p, size in zip(paths, sizes, strict=True):
        starts.append(pos)
        try:
            with open(p, "rb", buffering=0) as fh:
                got = fh.readinto(view[pos:pos + size])
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror}") from None
        pos += got
        if got and data[pos - 1] != 10:
            data[pos] = 10  # a cut-off last line is then reported by its field count
            pos += 1
    del view
    del data[pos:]
    file_start = np.array(starts, np.int64)
    raw = RawDumps(paths, data, file_start, *(np.zeros(0) for _ in range(8)))
    try:
        f = split_fields(data, b";")
    except FieldTooLong as e:
        raise InputError(f"{raw.locate(e.offset)}: not an ipa-clones dump (line too long or binary)") from None
    nf = f.nfields
    first = f.first
    head = f.hash[first]
    is12 = (nf == 12) & (head == np.uint64(_H_CLONE))
    is14 = (nf == 14) & (head == np.uint64(_H_CLONE))
    if is14.any():
        f14 = first[is14]
        ok = (f.hash[f14 + 6] == np.uint64(_H_ARROW)) & (f.hash[f14 + 12] == np.uint64(_H_OPT))
        is14[np.flatnonzero(is14)[~ok]] = False
    isrm = (nf == 6) & (head == np.uint64(_H_REMOVAL))
    blank = (nf == 1) & (f.length[first] == 0)
    bad = ~(is12 | is14 | isrm | blank)
    if bad.any():
        i = int(np.argmax(bad))
        _bad_line(raw, f.start[first[i]], int(nf[i]), int(head[i]))
    line_dump = np.searchsorted(file_start, f.start[first], side="right") - 1
    clone_first = np.concatenate([first[is12][:, None] + _COLS12, first[is14][:, None] + _COLS14])
    raw.c_dump = np.concatenate([line_dump[is12], line_dump[is14]])
    raw.c_hash, raw.c_off, raw.c_len = f.hash[clone_first], f.start[clone_first], f.length[clone_first]
    rm_first = first[isrm][:, None] + _COLSRM
    raw.r_dump = line_dump[isrm]
    raw.r_hash, raw.r_off, raw.r_len = f.hash[rm_first], f.start[rm_first], f.length[rm_first]
    return raw


def _bad_line(raw: RawDumps, offset: int, nf: int, head: int) -> None:
    where = raw.locate(int(offset))
    end = raw.data.find(b"\n", int(offset))
    text = raw.data[int(offset):end].decode("utf-8", "replace")
    shown = text if len(text) <= 60 else text[:57] + "..."
    if head == _H_CLONE:
        if nf < 12:
            raise InputError(f"{where}: truncated clone record ({nf} of 12 fields): {shown!r}")
        raise InputError(f"{where}: unknown clone record format ({nf} fields; expected 12, or 14 with "
                         f"'<-' and 'optimization:'): {shown!r}")
    if head == _H_REMOVAL:
        raise InputError(f"{where}: malformed removal record ({nf} fields, expected 6): {shown!r}")
    line_no = int(where.rsplit(":", 1)[1])
    if line_no == 1:
        raise InputError(f"{where}: not an ipa-clones dump (expected 'Callgraph clone;' or "
                         f"'Callgraph removal;' records, found {shown!r})")
    raise InputError(f"{where}: not an ipa-clones record: {shown!r}")
