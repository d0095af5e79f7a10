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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import InputError
from ..util.fsutil import open_regular
from .tokens import PAD, find_seps, group, span_hash, u64_view

__all__ = ["DUMP_SUFFIX", "KIND_CODES", "RawDumps", "find_dumps", "parse_dumps", "object_for_dump", "objects_for_dumps",
           "lto_link_of", "read_files", "text_is", "classify"]

DUMP_SUFFIX = ".ipa-clones"
_LTO_RE = re.compile(r"^(?P<link>.+)\.(?:wpa|ltrans\d+\.ltrans)\.\d+i\.ipa-clones$")
#: kind field text -> kind code (index into ``index.KINDS``); anything else is "other" (5)
KIND_CODES = {"inlining to": 0, "constprop": 1, "isra": 2, "part": 3, "(null)": 4}
_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


@dataclass
class RawDumps:
    """Records of a set of dumps, as positions in one buffer; nothing is decoded yet.

    ``sp`` holds the offset of every ``;`` and newline in ``data``. A function mention is stored as the
    index ``i`` into ``sp`` of the end of its name field: the name is ``data[sp[i-1]+1:sp[i]]`` and its
    location ``FILE;LINE;COL`` is ``data[sp[i+1]+1:sp[i+4]]`` (the ORDER field between is skipped).
    """

    paths: list[Path]
    data: bytearray  # all dumps, newline-terminated, plus PAD zero bytes
    file_start: np.ndarray  # byte offset of each dump in data
    sp: np.ndarray  # int64 offsets of separators
    c_dump: np.ndarray  # per clone record: dump index
    c_orig: np.ndarray  # sp index of the original's name end
    c_new: np.ndarray  # sp index of the new function's name end
    c_kind: np.ndarray  # int8 kind code (KIND_CODES, 5 = other)
    r_dump: np.ndarray  # per removal record
    r_func: np.ndarray
    # per mention (clone originals, clone new functions, removals - in that order): its unit (see
    # index._units); and per unit, the index of its first mention
    m_unit: np.ndarray
    u_men: np.ndarray

    def locate(self, offset: int) -> str:
        """``path:line`` of a byte offset in ``data``."""
        i = int(np.searchsorted(self.file_start, offset, side="right")) - 1
        line = self.data.count(b"\n", int(self.file_start[i]), offset) + 1
        return f"{self.paths[i]}:{line}"

    def name_span(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of the name of mentions ``i``."""
        return self.sp[i - 1] + 1, self.sp[i]

    def loc_spans(self, i: np.ndarray) -> tuple[np.ndarray, ...]:
        """(file start, file end, line end, col end) of mentions ``i``: line is ``[file end+1, line end)``."""
        return self.sp[i + 1] + 1, self.sp[i + 2], self.sp[i + 3], self.sp[i + 4]

    def func_hash(self, i: np.ndarray) -> np.ndarray:
        """One 64-bit hash of (name, file, line, col) per mention: equal functions, equal hashes."""
        words = u64_view(self.data)
        with np.errstate(over="ignore"):
            h = span_hash(words, self.sp[i - 1] + 1, self.sp[i])
            h *= _MIX
            h ^= span_hash(words, self.sp[i + 1] + 1, self.sp[i + 4])
        return h


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
            r = Path(root)
            found.extend(r / f for f in sorted(files) if f.endswith(DUMP_SUFFIX))  # '/' is cheaper than Path()
        return found
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.name.endswith(DUMP_SUFFIX):
        return [p]
    try:
        with open_regular(p, limit=256 << 20) as f:
            text = f.read().decode()
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
            if q.exists():
                raise InputError(f"{p}:{n}: listed dump {name!r} is not a regular file")
            raise InputError(f"{p}:{n}: listed dump {name!r} does not exist")
        out.append(q)
    return out


def lto_link_of(dump: Path) -> Path | None:
    """The linked output an LTO link-time dump belongs to, or None for a compile-time dump.

    >>> lto_link_of(Path("out/prog.ltrans0.ltrans.000i.ipa-clones"))
    PosixPath('out/prog')
    """
    name = dump.name
    if ".wpa." not in name and ".ltrans" not in name:  # cheap test first: called for every dump
        return None
    m = _LTO_RE.match(name)
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


def objects_for_dumps(dumps: list[Path], objects: Path | None = None, dumps_root: Path | None = None) -> list[
        str | os.PathLike[str] | None]:
    """:func:`object_for_dump` for many dumps, listing each directory once instead of probing files
    (plain strings where that is faster than paths).

    >>> objects_for_dumps([Path("/nonexistent/x.c.000i.ipa-clones")])
    [None]
    """
    listing: dict[str, set[str]] = {}

    def has(d: str, name: str) -> bool:
        if d not in listing:
            try:
                listing[d] = set(os.listdir(d))
            except OSError:
                listing[d] = set()
        return name in listing[d]

    out: list[str | os.PathLike[str] | None] = []
    for dump in dumps:
        if objects is not None or lto_link_of(dump) is not None:
            out.append(object_for_dump(dump, objects, dumps_root))
            continue
        d, _, name = os.fspath(dump).rpartition("/")
        d = d or "."
        base = os.path.splitext(_DUMP_TAIL.sub("", name))[0]
        if has(d, base + ".o.syms"):
            out.append(f"{d}/{base}.o.syms")
        elif has(d, base + ".o"):
            out.append(f"{d}/{base}.o")
        else:
            out.append(None)
    return out


_DUMP_TAIL = re.compile(r"\.\d+i\.ipa-clones$")


def read_files(paths: Sequence[str | os.PathLike[str]], sep_after: bool = True) -> tuple[bytearray, np.ndarray]:
    """All files in one buffer (each ending in a newline), followed by :data:`~.tokens.PAD` zero bytes;
    and where each file starts. Raises :class:`InputError` naming an unreadable file.

    >>> read_files([])[0]
    bytearray(b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00')
    """
    names = [os.fspath(p) for p in paths]
    sizes = []
    for n in names:
        try:
            sizes.append(os.stat(n).st_size)
        except OSError as e:
            raise InputError(f"{n}: cannot read: {e.strerror}") from None
    # one buffer for all files, filled in place: no second copy of ~60 MB
    data = bytearray(sum(sizes) + len(names) + PAD)
    view = memoryview(data)
    starts = np.empty(len(names), np.int64)
    pos = 0
    for k, (n, size) in enumerate(zip(names, sizes, strict=True)):
        starts[k] = pos
        try:
            with open_regular(n) as f:  # a FIFO named *.ipa-clones would block the read for ever
                got = os.readv(f.fileno(), [view[pos:pos + size]]) if size else 0
        except OSError as e:
            raise InputError(f"{n}: cannot read: {e.strerror}") from None
        pos += got
        if got and data[pos - 1] != 10 and sep_after:
            data[pos] = 10  # a cut-off last line is then reported by its field count
            pos += 1
    del view
    del data[pos:]
    data += bytes(PAD)
    return data, starts


def text_is(words: np.ndarray, start: np.ndarray, end: np.ndarray, text: bytes) -> np.ndarray:
    """Which spans ``[start, end)`` hold exactly ``text`` (compared eight bytes at a time).

    >>> from .tokens import pad
    >>> b = pad(b"isra;part"); text_is(u64_view(b), np.array([0, 5]), np.array([4, 9]), b"part").tolist()
    [False, True]
    """
    return classify(words, start, end, [text]) == 0


def classify(words: np.ndarray, start: np.ndarray, end: np.ndarray, texts: list[bytes]) -> np.ndarray:
    """Index into ``texts`` of the text each span holds exactly, ``len(texts)`` for none (int8). Each
    8-byte column of the spans is gathered once for all texts.

    >>> from .tokens import pad
    >>> b = pad(b"FUNC;FILE;X"); classify(u64_view(b), np.array([0, 5, 10]), np.array([4, 9, 11]),
    ...                                  [b"FILE", b"FUNC"]).tolist()
    [1, 0, 2]
    """
    ln = end - start
    out = np.full(len(start), len(texts), np.int8)
    cache: dict[int, np.ndarray] = {}
    last = len(words) - 1
    for code, text in enumerate(texts):
        n = len(text)
        ok = ln == n
        padded = text + bytes(8)
        for k in range(0, max(n, 1), 8):
            if k not in cache:  # a shorter span already failed on length, so clamping is harmless
                cache[k] = words[np.minimum(start + k, last)]
            keep = min(8, n - k)
            mask = (1 << (8 * keep)) - 1 if keep > 0 else 0
            ok &= (cache[k] & np.uint64(mask)) == np.uint64(int.from_bytes(padded[k:k + 8], "little") & mask)
        out[ok] = code
    return out


_CLONE, _REMOVAL = b"Callgraph clone", b"Callgraph removal"


_BATCH = 1 << 20  # bytes of dump text split per step: the per-line arrays of a step stay in the CPU cache
_MASK5 = np.array([(1 << (8 * k)) - 1 for k in range(6)], np.uint64)


def parse_dumps(paths: list[Path]) -> RawDumps:
    """Read and split every dump; raise :class:`InputError` naming file and line for anything malformed.

    The text is split in batches of whole files of about :data:`_BATCH` bytes; each batch yields its
    records' positions, and the batches are concatenated.
    """
    data, file_start = read_files(paths)
    text_end = len(data) - PAD
    words = u64_view(data)
    bounds = np.append(file_start, text_end)
    cuts = [0]
    for f in range(1, len(paths)):
        if bounds[f] - bounds[cuts[-1]] >= _BATCH:
            cuts.append(f)
    cuts.append(len(paths))
    out: dict[str, list[np.ndarray]] = {}
    sp_parts: list[np.ndarray] = []
    base = 0
    for f0, f1 in zip(cuts[:-1], cuts[1:], strict=True):
        lo, hi = int(bounds[f0]), int(bounds[f1])
        if hi <= lo:
            continue
        sp, part = _parse_batch(data, words, paths, file_start, f0, f1, lo, hi, base)
        sp_parts.append(sp)
        base += len(sp)
        for key, v in part.items():
            out.setdefault(key, []).append(v)
    cat = {key: np.concatenate(out.pop(key)) for key in ("c_dump", "c_orig", "c_new", "c_kind", "r_dump", "r_func")
           if key in out}
    empty = np.zeros(0, np.int64)
    g = {k: cat.get(k, empty) for k in ("c_dump", "c_orig", "c_new", "c_kind", "r_dump", "r_func")}
    sp_all = np.concatenate(sp_parts) if sp_parts else np.zeros(0, np.int32)
    del sp_parts  # the batches' copies: 4 bytes per separator
    # units were numbered per batch: make the ids global, and find each unit's first mention in the
    # global mention order (all originals, then all new functions, then all removals)
    counts = {t: np.array([len(v) for v in out.get("u_" + t, [])], np.int64) for t in "onr"}
    tot = {t: int(counts[t].sum()) for t in "onr"}
    base_t = {"o": 0, "n": tot["o"], "r": tot["o"] + tot["n"]}
    prior = {t: np.concatenate([[0], np.cumsum(counts[t])[:-1]]) for t in "onr"}  # earlier batches' mentions
    unit_parts: dict[str, list[np.ndarray]] = {t: [] for t in "onr"}
    men_parts = []
    nu = 0
    for b, uf in enumerate(out.get("u_first", [])):
        # a unit's first mention, from its index in the batch's (originals, new, removals) to the global one
        k1, k2 = int(counts["o"][b]), int(counts["o"][b] + counts["n"][b])
        glob = np.where(uf < k1, base_t["o"] + prior["o"][b] + uf,
                        np.where(uf < k2, base_t["n"] + prior["n"][b] + uf - k1, base_t["r"] + prior["r"][b] + uf - k2))
        men_parts.append(glob)
        for t in "onr":
            unit_parts[t].append(out["u_" + t][b] + nu)
        nu += len(uf)
    m_unit = np.concatenate([x for t in "onr" for x in unit_parts[t]]) if men_parts else empty
    u_men = np.concatenate(men_parts) if men_parts else empty
    return RawDumps(list(paths), data, file_start, sp_all, g["c_dump"], g["c_orig"], g["c_new"],
                    g["c_kind"].astype(np.int8), g["r_dump"], g["r_func"], m_unit, u_men)


def _parse_batch(data: bytearray, words: np.ndarray, paths: list[Path], file_start: np.ndarray, f0: int, f1: int,
                 lo: int, hi: int, base: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split dumps ``f0..f1-1`` (bytes ``lo..hi``); sp indexes in the result are global (``base`` +)."""
    found: list[np.ndarray] = []
    sp = _seps_from(data, lo, hi, found)
    nl = found[0]  # index in sp of each line's end
    first = np.empty(len(nl), np.int64)  # index in sp of the end of each line's first field
    first[:1] = 0
    first[1:] = nl[:-1] + 1
    nf = nl - first + 1
    lstart = np.empty(len(nl), np.int64)
    lstart[:1] = lo
    lstart[1:] = sp[nl[:-1]] + 1
    head_end = sp[first]
    head = classify(words, lstart, head_end, [_CLONE, _REMOVAL])
    isc = head == 0
    is12 = isc & (nf == 12)
    is14 = isc & (nf == 14)
    if is14.any():
        f14 = first[is14]
        ok = (text_is(words, sp[f14 + 5] + 1, sp[f14 + 6], b"<-")
              & text_is(words, sp[f14 + 11] + 1, sp[f14 + 12], b"optimization:"))
        is14[np.flatnonzero(is14)[~ok]] = False
    isrm = (nf == 6) & (head == 1)
    blank = (nf == 1) & (head_end == lstart)
    bad = ~(is12 | is14 | isrm | blank)
    if bad.any():
        i = int(np.argmax(bad))
        _bad_line(data, file_start, paths, int(lstart[i]), int(nf[i]), bool(isc[i]), bool(head[i] == 1))
    # lines and files are both in buffer order: count the lines of each file instead of searching per line
    line_dump = np.repeat(np.arange(f0, f1, dtype=np.int64),
                          np.diff(np.append(np.searchsorted(lstart, file_start[f0:f1]), len(lstart))))
    clone = is12 | is14
    cf = first[clone]
    c14 = is14[clone]
    c_kind_end = cf + np.where(c14, 13, 11)
    c_kind = classify(words, sp[c_kind_end - 1] + 1, sp[c_kind_end], [k.encode() for k in KIND_CODES])
    c_orig = cf + 1
    c_new = cf + np.where(c14, 7, 6)
    r_func = first[isrm] + 1
    part = {"c_dump": line_dump[clone], "c_orig": c_orig + base, "c_new": c_new + base, "c_kind": c_kind,
            "r_dump": line_dump[isrm], "r_func": r_func + base}
    # units: mentions with the same dump and ORDER bytes (see index._units); a batch holds whole dumps, so
    # units are found per batch, on arrays that stay in cache
    men = np.concatenate([c_orig, c_new, r_func])
    mdump = np.concatenate([part["c_dump"], part["c_dump"], part["r_dump"]])
    ostart = sp[men] + 1
    olen = sp[men + 1] - ostart
    okey = words[ostart]
    okey &= _MASK5[np.minimum(olen, 5)]
    okey |= mdump.astype(np.uint64) << np.uint64(40)
    bad = np.flatnonzero((olen > 5) | (olen < 1))
    okey[bad] = np.uint64(1 << 63) | bad.astype(np.uint64)  # no usable ORDER: a unit of its own
    with np.errstate(over="ignore"):
        okey *= _MIX  # odd multiplier, a bijection: spreads the key over the high bits group() sorts on
    _, ufirst, uinv = group(okey)
    # "name;order;file;line;col" must have the same length as in the unit's first mention
    span = sp[men + 4] - sp[men - 1]
    unit = uinv
    odd = np.flatnonzero(span != span[ufirst[unit]])
    if len(odd):  # never seen with GCC: keep them apart, identified by their full text
        unit[odd] = len(ufirst) + np.arange(len(odd))
    k1, k2 = len(c_orig), len(c_orig) + len(c_new)
    part["u_o"], part["u_n"], part["u_r"] = unit[:k1], unit[k1:k2], unit[k2:]
    part["u_first"] = np.concatenate([ufirst, odd])  # first mention of each unit, as an index into men
    return sp, part


def _seps_from(data: bytearray, lo: int, hi: int, found: list[np.ndarray]) -> np.ndarray:
    """:func:`~.tokens.find_seps` of ``data[lo:hi]``, as offsets in ``data``."""
    sp = find_seps(memoryview(data)[lo:hi], b";", None, found)
    sp += lo
    return sp


def _bad_line(data: bytearray, file_start: np.ndarray, paths: list[Path], offset: int, nf: int, clone: bool,
              removal: bool) -> None:
    i = int(np.searchsorted(file_start, offset, side="right")) - 1
    line_no = data.count(b"\n", int(file_start[i]), offset) + 1
    where = f"{paths[i]}:{line_no}"
    end = data.find(b"\n", offset)
    text = data[offset:end].decode("utf-8", "replace")
    shown = text if len(text) <= 60 else text[:57] + "..."
    if clone:
        if nf < 12:
            raise InputError(f"{where}: truncated clone record ({nf} of 12 fields): {shown!r}")
        raise InputError(f"{where}: unknown clone record format ({nf} fields; expected 12, or 14 with "
                         f"'<-' and 'optimization:'): {shown!r}")
    if removal:
        raise InputError(f"{where}: malformed removal record ({nf} fields, expected 6): {shown!r}")
    if line_no == 1:
        raise InputError(f"{where}: not an ipa-clones dump (expected 'Callgraph clone;' or "
                         f"'Callgraph removal;' records, found {shown!r})")
    raise InputError(f"{where}: not an ipa-clones record: {shown!r}")
