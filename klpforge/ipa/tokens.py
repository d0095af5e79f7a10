"""Vectorised text primitives for dumps and symbol files: separators, span hashes, grouping, string tables.

A dump is never turned into one Python object per line. The whole buffer is scanned once for separators
(``bytes.translate`` + ``np.flatnonzero``), and every span we need gets a 64-bit hash computed eight bytes
at a time (unaligned little-endian words), so equal strings get equal hashes wherever they appear. Strings
are decoded only for the distinct values a query shows (see :class:`StrTable`).

>>> buf = pad(b"ab;cd;ab\\n"); sp = find_seps(buf, b";")
>>> sp.tolist()
[2, 5, 8]
>>> h = span_hash(u64_view(buf), np.array([0, 3, 6]), np.array([2, 5, 8])); bool(h[0] == h[2] != h[1])
True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

__all__ = ["MAX_FIELD", "FieldTooLong", "PAD", "pad", "u64_view", "find_seps", "span_hash", "hash_strings",
           "group", "first_order", "parse_uint", "StrTable"]

#: Longest span hashed; longer ones mean the file is not the text we expect.
MAX_FIELD = 4096
#: Bytes of zero padding a buffer needs after its text, so an 8-byte load at any text offset stays inside.
PAD = 8
_CHUNK_SPANS = 1 << 16  # spans hashed per vectorised step: keeps the temporaries small (peak memory)
_CHUNK_BYTES = 1 << 18  # bytes scanned per separator step (fits in L2)
_BLOCK = 4  # words per span hashed in one vectorised step
_K = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers: word mix, length term
_P = 0x100000001B3 * 2 + 1
_NW = MAX_FIELD // 8 + 2 * _BLOCK
with np.errstate(over="ignore"):
    # word j of a span is weighted by K * P**j: one multiply per word does both the mix and the position
    _PWK = np.empty(_NW, np.uint64)
    _PWK[0] = 1
    _PWK[1:] = _P
    np.cumprod(_PWK, out=_PWK)
    _PWK *= _K
_MASKS = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [2**64 - 1], np.uint64)


class FieldTooLong(ValueError):
    """A span is longer than :data:`MAX_FIELD`; ``offset`` is where it starts in the buffer."""

    def __init__(self, offset: int):
        super().__init__(f"field longer than {MAX_FIELD} bytes at offset {offset}")
        self.offset = offset


def pad(data: bytes | bytearray) -> bytearray:
    """A copy of ``data`` ending in a newline, followed by :data:`PAD` zero bytes.

    >>> pad(b"x")
    bytearray(b'x\\n\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00')
    """
    out = bytearray(data)
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out + bytes(PAD)


def u64_view(buf: bytearray | bytes) -> np.ndarray:
    """Unaligned little-endian 64-bit words at every byte offset of ``buf`` (which must end in :data:`PAD`
    zero bytes): ``u64_view(b)[i]`` is ``b[i:i + 8]``. No copy.

    >>> int(u64_view(pad(b"ab"))[0]) == int.from_bytes(b"ab\\n", "little")
    True
    """
    return np.ndarray((max(len(buf) - 7, 0),), np.dtype("<u8"), buffer=buf, strides=(1,))


def find_seps(buf: bytearray | bytes | memoryview, seps: bytes, end: int | None = None,
              lines: list[np.ndarray] | None = None) -> np.ndarray:
    """Offsets (ascending; int32 when the buffer allows, to halve the biggest array) of every newline and
    every byte of ``seps`` in ``buf[:end]``. Scanned in cache-sized chunks: comparing a chunk that stays
    in the CPU cache is several times faster than one pass over the whole buffer per separator. When
    ``lines`` is a list, the index into the result of every newline is appended to it (one array).

    >>> find_seps(b"a b\\nc\\n", b" ").tolist()
    [1, 3, 5]
    """
    n = len(buf) if end is None else end
    a = np.frombuffer(buf, np.uint8)
    dt = np.int32 if len(buf) < 2**31 - 16 else np.int64
    codes = [10, *seps]
    parts = []
    done = 0
    mask = np.empty(_CHUNK_BYTES, np.bool_)
    tmp = np.empty(_CHUNK_BYTES, np.bool_)
    for lo in range(0, n, _CHUNK_BYTES):
        hi = min(n, lo + _CHUNK_BYTES)
        x = a[lo:hi]
        m, t = mask[:hi - lo], tmp[:hi - lo]
        np.equal(x, codes[0], out=m)
        for c in codes[1:]:
            np.equal(x, c, out=t)
            m |= t
        part = np.flatnonzero(m).astype(dt)
        if lines is not None:
            nl = np.flatnonzero(x[part] == 10) + done
            lines.append(nl)
            done += len(part)
        parts.append(part + lo)
    if lines is not None:
        lines[:] = [np.concatenate(lines) if lines else np.zeros(0, np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, dt)


def span_hash(words: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """64-bit hash of each span ``[start, end)`` of the buffer behind ``words`` (:func:`u64_view`).

    Word ``j`` (bytes ``8j..8j+7`` of the span, zero past its end) is mixed, weighted by a per-position
    odd multiplier and summed, plus a length term; equal bytes give equal hashes whatever their offset.
    Words are taken in blocks of four columns, each block only over the spans still long enough.

    >>> b = pad(b"name;name\\n"); h = span_hash(u64_view(b), np.array([0, 5]), np.array([4, 9]))
    >>> bool(h[0] == h[1])
    True
    """
    n = len(start)
    out = np.empty(n, np.uint64)
    last = len(words) - 1
    cols = np.arange(_BLOCK, dtype=np.int64) << 3
    for c in range(0, n, _CHUNK_SPANS):
        s = start[c:c + _CHUNK_SPANS].astype(np.int64)
        e = end[c:c + _CHUNK_SPANS].astype(np.int64)
        ln = e - s
        if len(ln) and int(ln.max()) > MAX_FIELD:
            raise FieldTooLong(int(s[int(np.argmax(ln))]))
        with np.errstate(over="ignore"):
            h = ln.astype(np.uint64) * _K
            rows = None  # spans (indexes into this chunk) still to hash; None = all
            j0 = 0
            while True:
                ss = s if rows is None else s[rows]
                ee = e if rows is None else e[rows]
                pos = ss[:, None] + (cols + (j0 << 3))
                rem = ee[:, None] - pos
                np.clip(rem, 0, 8, out=rem)
                np.minimum(pos, last, out=pos)
                w = words[pos]
                w &= _MASKS[rem]  # bytes past the span's end do not count
                w ^= w >> np.uint64(29)  # so that the sum is not linear in the bytes
                w *= _PWK[j0:j0 + _BLOCK]
                part = w.sum(axis=1, dtype=np.uint64)
                if rows is None:
                    h += part
                else:
                    h[rows] += part
                j0 += _BLOCK
                more = np.flatnonzero(ee - ss > j0 << 3)
                if not len(more):
                    break
                rows = more if rows is None else rows[more]
        out[c:c + _CHUNK_SPANS] = h
    return out


def hash_strings(strings: Iterable[str]) -> np.ndarray:
    """Hash each string the way :func:`span_hash` hashes the same bytes in a buffer.

    >>> b = pad(b"foo;bar"); bool(hash_strings(["bar"])[0] == span_hash(u64_view(b), np.array([4]), np.array([7]))[0])
    True
    """
    enc = [s.encode() for s in strings]
    if not enc:
        return np.zeros(0, np.uint64)
    lens = np.array([len(x) for x in enc], np.int64)
    end = np.cumsum(lens + 1) - 1
    buf = bytearray(b"\n".join(enc) + b"\n" + bytes(PAD))
    return span_hash(u64_view(buf), end - lens, end)


def group(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal values of ``h`` (uint64): (sorted distinct values, first index of each, group per item).

    Like ``np.unique(h, return_index=True, return_inverse=True)``, but it sorts the hash's high bits packed
    with the item index (a plain ``sort``, several times faster than ``argsort``), and falls back to a
    stable ``argsort`` when the high bits do not already order the full values.

    >>> [a.tolist() for a in group(np.array([5, 3, 5], np.uint64))]
    [[3, 5], [1, 0], [1, 0, 1]]
    """
    n = len(h)
    if n == 0:
        return h[:0], np.zeros(0, np.int64), np.zeros(0, np.int64)
    b = max(1, (n - 1).bit_length())
    perm = None
    if b <= 28:
        low = np.uint64((1 << b) - 1)
        packed = h & ~low
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        packed &= low
        perm = packed.view(np.int64)
        hs = h[perm]
        if n > 1 and not (hs[1:] >= hs[:-1]).all():
            perm = None
    if perm is None:
        perm = np.argsort(h, kind="stable")
        hs = h[perm]
    new = np.empty(n, np.bool_)
    new[0] = True
    np.not_equal(hs[1:], hs[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    gid = np.cumsum(new, dtype=np.int64)
    gid -= 1
    inv = np.empty(n, np.int64)
    inv[perm] = gid
    return hs[starts], perm[starts], inv


def first_order(first: np.ndarray, n: int) -> np.ndarray:
    """Renumbering of groups (given each group's first item index, all < ``n``) in order of first
    appearance: ``new_id[group]``. Linear, no sort.

    >>> first_order(np.array([4, 0, 2]), 5).tolist()
    [2, 0, 1]
    """
    mark = np.zeros(n, np.bool_)
    mark[first] = True
    rank = np.cumsum(mark, dtype=np.int64)
    rank -= 1
    return rank[first]


def parse_uint(buf: bytes | bytearray, start: np.ndarray, end: np.ndarray, base: int = 10) -> tuple[
        np.ndarray, np.ndarray]:
    """Unsigned integers written in spans (decimal or hex, at most 16 digits): (values, ok mask).

    ``buf`` must end in :data:`PAD` zero bytes. Decimal spans of up to 8 digits and hex spans of exactly
    16 digits (symbol values) are converted eight digits per 64-bit word (SWAR); others go through a
    right-aligned digit matrix.

    >>> b = pad(b"12;x;ff;0000000000000010")
    >>> v, ok = parse_uint(b, np.array([0, 3, 5, 8]), np.array([2, 4, 7, 24]), 16)
    >>> v.tolist(), ok.tolist()
    ([18, 0, 255, 16], [True, False, True, True])
    """
    n = len(start)
    start = start.astype(np.int64)
    end = end.astype(np.int64)
    ln = end - start
    val = np.zeros(n, np.int64)
    ok = np.zeros(n, np.bool_)
    words = u64_view(buf)
    if base == 10:
        fast = (ln > 0) & (ln <= 8)
        if fast.all():
            return _swar_dec(words, start, ln)
        f = np.flatnonzero(fast)
        val[f], ok[f] = _swar_dec(words, start[f], ln[f])
    else:
        fast = ln == 16
        if fast.all():
            return _swar_hex16(words, start)
        f = np.flatnonzero(fast)
        val[f], ok[f] = _swar_hex16(words, start[f])
    slow = np.flatnonzero(~fast)
    val[slow], ok[slow] = _digits_matrix(buf, start[slow], end[slow], base)
    return val, ok


_ZEROS = np.uint64(0x3030303030303030)
_HI = np.uint64(0x8080808080808080)


def _swar_dec(words: np.ndarray, start: np.ndarray, ln: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1 to 8 decimal digits per span, converted in one word: right-aligned, '0'-filled, then combined
    pairwise (the classic SWAR digit parse)."""
    w = words[start]
    sh = ((8 - ln) << 3).astype(np.uint64)
    w <<= sh  # digits to the top bytes; the first digit is the most significant
    w |= _ZEROS & ~(~np.uint64(0) << sh)
    v = w - _ZEROS
    # every byte must be 0..9: no byte below '0' (the subtraction would borrow), none above '9'
    ok = ((w & np.uint64(0xF0F0F0F0F0F0F0F0)) == _ZEROS) & (((v + np.uint64(0x7676767676767676)) & _HI) == 0)
    with np.errstate(over="ignore"):
        v = (v * np.uint64(10) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
        v = (v * np.uint64(100) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
        v = (v * np.uint64(10000) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    v[~ok] = 0
    return v.view(np.int64), ok


def _swar_hex16(words: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exactly 16 hex digits per span, as two words of eight nibbles each."""
    out = np.zeros(len(start), np.uint64)
    ok = np.ones(len(start), np.bool_)
    for half in (0, 8):
        w = words[start + half]
        lo4 = w & np.uint64(0x0F0F0F0F0F0F0F0F)
        hi4 = w & np.uint64(0xF0F0F0F0F0F0F0F0)
        alpha = (w >> np.uint64(6)) & np.uint64(0x0101010101010101)
        # digit bytes are 0x30..0x39; letters 0x41..0x46 / 0x61..0x66
        dig = hi4 == _ZEROS
        ok &= np.where(dig, ((lo4 + np.uint64(0x0606060606060606)) & np.uint64(0xF0F0F0F0F0F0F0F0)) == 0,
                       _all_hex_letters(w))
        v = lo4 + alpha * np.uint64(9)
        v = v.byteswap()  # most significant nibble to the top byte
        v = (v | (v >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
        v = (v | (v >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
        v = (v | (v >> np.uint64(16))) & np.uint64(0xFFFFFFFF)
        out = (out << np.uint64(32)) | v
    out[~ok] = 0
    return out.view(np.int64), ok


def _all_hex_letters(w: np.ndarray) -> np.ndarray:
    """Per word: all eight bytes are hex digits (digits or a-f/A-F), checked byte-wise (rare path)."""
    b = w.view(np.uint8).reshape(-1, 8)
    lo = b | np.uint8(32)
    return np.asarray((((b >= 48) & (b <= 57)) | ((lo >= 97) & (lo <= 102))).all(axis=1))


def _digits_matrix(buf: bytes | bytearray, start: np.ndarray, end: np.ndarray, base: int) -> tuple[
        np.ndarray, np.ndarray]:
    n = len(start)
    ln = end - start
    ok = (ln > 0) & (ln <= 16)
    width = min(int(ln.max()) if n else 0, 16)
    if not width:
        return np.zeros(n, np.int64), ok
    a = np.frombuffer(buf, np.uint8)
    idx = end[:, None] + np.arange(-width, 0, dtype=np.int64)
    inside = idx >= start[:, None]
    np.maximum(idx, 0, out=idx)
    c = a[idx]
    c[~inside] = 48  # leading zeros
    if base == 16:
        lo = c | np.uint8(32)
        d = np.where(lo >= 97, lo - np.uint8(87), c - np.uint8(48))
        ok &= (((c >= 48) & (c <= 57)) | ((lo >= 97) & (lo <= 102))).all(axis=1)
    else:
        d = c - np.uint8(48)  # wraps for bytes below '0'
        ok &= (d <= 9).all(axis=1)
    pw = np.uint64(base) ** np.arange(width - 1, -1, -1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        val = (d.astype(np.uint64) * pw).sum(axis=1, dtype=np.uint64)
    val[~ok] = 0
    return val.view(np.int64), ok


class StrTable:
    """An immutable list of strings stored as one UTF-8 blob and end offsets; items decode on access.

    >>> t = StrTable.from_list(["a", "bc"]); t[1], len(t), list(t)
    ('bc', 2, ['a', 'bc'])
    """

    __slots__ = ("blob", "ends")

    def __init__(self, blob: bytes, ends: np.ndarray):
        self.blob = blob
        self.ends = ends

    @classmethod
    def from_list(cls, items: list[str]) -> StrTable:
        """Table of ``items``."""
        enc = [s.encode() for s in items]
        return cls(b"".join(enc), np.cumsum([len(x) for x in enc], dtype=np.int64))

    @classmethod
    def from_spans(cls, buf: bytes | bytearray, start: np.ndarray, end: np.ndarray) -> StrTable:
        """Table of the spans ``buf[start[i]:end[i]]``, gathered with numpy."""
        ln = (end - start).astype(np.int64)
        ends = np.cumsum(ln)
        if not len(ln) or not ends[-1]:
            return cls(b"", ends)
        idx = np.arange(int(ends[-1]), dtype=np.int64)
        idx += np.repeat(start.astype(np.int64) - (ends - ln), ln)
        return cls(np.frombuffer(buf, np.uint8)[idx].tobytes(), ends)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if i < 0:
            i += len(self.ends)
        e = int(self.ends[i])
        s = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[s:e].decode("utf-8", "replace")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def many(self, ids: np.ndarray) -> list[str]:
        """Strings for an array of ids (one decode per id)."""
        return [self[i] for i in ids.tolist()]
