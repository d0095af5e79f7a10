"""Vectorised splitting of text records into fields, each field reduced to a 64-bit hash.

A dump or symbol file is never turned into one Python object per line: the whole buffer is scanned with
numpy for separators, and every field gets a hash computed from its bytes, so equal strings get equal
hashes wherever they appear. Strings are decoded only once per distinct value (see :func:`intern`).

>>> t = split_fields(b"a;bb\\nccc;a\\n", b";")
>>> t.nfields.tolist(), bool(t.hash[0] == t.hash[3])
([2, 2], True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_FIELD", "Fields", "split_fields", "hash_strings", "intern", "FieldTooLong"]

#: Longest field accepted; longer ones mean the file is not the text we expect.
MAX_FIELD = 4096
_CHUNK = 1 << 18  # bytes per vectorised step: small enough to stay in the CPU cache
_P = 0x100000001B3 * 2 + 1  # odd, so invertible modulo 2**64
_PW = np.empty(_CHUNK + 1, np.uint64)  # _P**i, and its inverse, for positions within a chunk
_IPW = np.empty(_CHUNK + 1, np.uint64)
with np.errstate(over="ignore"):
    _PW[0] = _IPW[0] = 1
    _PW[1:] = _P
    _IPW[1:] = pow(_P, -1, 2**64)
    np.cumprod(_PW, out=_PW)
    np.cumprod(_IPW, out=_IPW)
_LEN_MUL = np.uint64(0x9E3779B97F4A7C15)

class FieldTooLong(ValueError):
    """A field is longer than :data:`MAX_FIELD`; ``offset`` is where it starts in the buffer."""

    def __init__(self, offset: int):
        super().__init__(f"field longer than {MAX_FIELD} bytes at offset {offset}")
        self.offset = offset


@dataclass
class Fields:
    """Fields of a buffer: ``start``/``length``/``hash`` per field, ``first``/``nfields`` per line."""

    start: np.ndarray  # int64, offset of each field in the buffer
    length: np.ndarray  # int32
    hash: np.ndarray  # uint64
    first: np.ndarray  # int64, index of each line's first field
    nfields: np.ndarray  # int32, fields per line


def _split_chunk(a: np.ndarray, seps: bytes, base: int, out: Fields, k: int) -> int:
    """Fill ``out``'s field arrays from index ``k`` with the fields of chunk ``a``; return the next index."""
    mask = a == 10
    for s in seps:
        mask |= a == s
    sp = np.flatnonzero(mask)
    n = len(sp)
    starts = np.empty(n, np.int64)
    starts[:1] = 0
    starts[1:] = sp[:-1] + 1
    lens = sp - starts
    if n and int(lens.max()) > MAX_FIELD:
        raise FieldTooLong(base + int(starts[int(np.argmax(lens))]))
    # polynomial hash: field [s, e) -> sum(a[j] * P**j) * P**-s, all modulo 2**64
    v = a.astype(np.uint64)
    v[sp] = 0  # separators do not count, so a name hashes the same before ';' and before '\n'
    h = out.hash[k:k + n]
    with np.errstate(over="ignore"):
        np.multiply(v, _PW[:len(a)], out=v)
        np.add.reduceat(v, starts, out=h)
        h *= _IPW[starts]
        h += lens.astype(np.uint64) * _LEN_MUL
    out.start[k:k + n] = starts + base
    out.length[k:k + n] = lens
    out.first[k:k + n] = a[sp] == 10  # line ends for now; turned into line starts by split_fields
    return k + n


def _grow(x: np.ndarray, cap: int, used: int) -> np.ndarray:
    y = np.empty(cap, x.dtype)
    y[:used] = x[:used]
    return y


def split_fields(data: bytes | bytearray, seps: bytes = b";") -> Fields:
    """Split ``data`` (lines ending in ``\\n``) into fields separated by any byte of ``seps``.

    Raises :class:`FieldTooLong` for a field longer than :data:`MAX_FIELD` (binary or foreign input).

    >>> split_fields(b"x y\\n", b" ").length.tolist()
    [1, 1]
    """
    if data and not data.endswith(b"\n"):
        data += b"\n"
    out = Fields(*(np.empty(0, t) for t in (np.int64, np.int32, np.uint64, np.bool_, np.int32)))
    cap = 0
    buf = np.frombuffer(data, np.uint8)
    pos = k = 0
    n = len(data)
    while pos < n:
        end = data.rfind(b"\n", pos, min(n, pos + _CHUNK)) + 1
        if end <= pos:  # a line longer than a chunk: no real record is that long
            raise FieldTooLong(pos)
        if cap - k < end - pos:
            if cap == 0:  # estimate the field count from a few samples, so growing is rare
                seps_b = np.frombuffer(seps + b"\n", np.uint8)
                probe = [buf[i:i + 65536] for i in range(0, n, max(65536, n // 8))]
                dense = sum(int(np.count_nonzero(np.isin(x, seps_b))) for x in probe)
                cap = int(dense * 1.2 * n / sum(len(x) for x in probe)) + (end - pos)
            else:
                cap = max(cap * 3 // 2, k + end - pos)
            out.start, out.length, out.hash, out.first = (
                _grow(x, cap, k) for x in (out.start, out.length, out.hash, out.first))
        k = _split_chunk(buf[pos:end], seps, pos, out, k)
        pos = end
    out.start, out.length, out.hash, out.first = out.start[:k], out.length[:k], out.hash[:k], out.first[:k]
    ends = np.flatnonzero(out.first)
    first = np.empty(len(ends), np.int64)
    first[:1] = 0
    first[1:] = ends[:-1] + 1
    out.first = first
    out.nfields = (ends - first + 1).astype(np.int32)
    return out


def hash_strings(strings: list[str]) -> np.ndarray:
    """Hash each string the way :func:`split_fields` hashes a field.

    >>> t = split_fields(b"foo;bar\\n"); bool((hash_strings(["bar"]) == t.hash[1]).all())
    True
    """
    if not strings:
        return np.zeros(0, np.uint64)
    data = "\n".join(strings).encode() + b"\n"
    return split_fields(data, b"").hash


def intern(hashes: np.ndarray, starts: np.ndarray, lengths: np.ndarray, data: bytes | bytearray) -> tuple[
        np.ndarray, np.ndarray, list[str]]:
    """Give equal hashes one id; return (sorted unique hashes, id per input, decoded string per id).

    >>> d = b"ab;cd;ab\\n"; t = split_fields(d)
    >>> intern(t.hash, t.start, t.length, d)[2] == sorted(["ab", "cd"], key=lambda s: int(hash_strings([s])[0]))
    True
    """
    uniq, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
    st = starts[first].tolist()
    ln = lengths[first].tolist()
    mv = memoryview(data)
    strings = [bytes(mv[s:s + n]).decode("utf-8", "replace") for s, n in zip(st, ln, strict=True)]
    return uniq, inv.astype(np.int64), strings
