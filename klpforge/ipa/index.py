"""The impact index: functions, per-object graph nodes, transform edges and symbol tables, as numpy arrays.

A *function* is (name, file, line, column) - the same header function in many objects is one function.
A *node* is a function inside one group (a translation unit, or a whole LTO link): inlining and cloning
happen per group, so the closure runs on nodes. Built once from the dumps (a second or so on a whole
vmlinux) and cached on disk, so a query with a warm cache only loads arrays.

>>> idx = build_index(find_dumps("tests/ipa_data"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fsutil import atomic_write
from .dumps import RawDumps, lto_link_of, object_for_dump, parse_dumps
from .objsyms import read_symbols, syms_text
from .tokens import FieldTooLong, hash_strings, split_fields

__all__ = ["Index", "build_index", "load_index", "cache_dir", "KINDS", "SYM_TYPES", "SYM_BINDS"]

#: Edge kinds; anything else GCC writes (simdclone, target clones) is kept as "other".
KINDS = ("inline", "constprop", "isra", "part", "recursion", "other")
_KIND_TEXT = {"inlining to": 0, "constprop": 1, "isra": 2, "part": 3, "(null)": 4}
SYM_TYPES = ("NOTYPE", "FUNC", "OBJECT", "SECTION", "FILE", "OTHER")
SYM_BINDS = ("LOCAL", "GLOBAL", "WEAK", "OTHER")
_VERSION = 3
_LTO_PRIV = re.compile(r"\.lto_priv\.\d+")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/klpforge`` (default ``~/.cache/klpforge``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "klpforge"


@dataclass
class Index:
    """Everything a query needs; every field is a numpy array or a list of strings (see module doc)."""

    dumps: list[str]
    objects: list[str]  # per group: symbol table path, "" when there is none
    dump_group: np.ndarray
    names: list[str]
    name_hash: np.ndarray  # sorted uint64, position = name id
    files: list[str]
    f_name: np.ndarray  # per function
    f_file: np.ndarray
    f_line: np.ndarray
    f_col: np.ndarray
    n_group: np.ndarray  # per node
    n_func: np.ndarray
    n_removed: np.ndarray  # bool: a removal record exists
    e_src: np.ndarray  # per edge (deduplicated, sorted by src)
    e_dst: np.ndarray
    e_kind: np.ndarray
    e_count: np.ndarray
    e_ptr: np.ndarray  # CSR: edges of node i are e_ptr[i]:e_ptr[i+1]
    s_group: np.ndarray  # per symbol, sorted by (group, base name)
    s_name: np.ndarray
    s_base: np.ndarray  # name id with .lto_priv.N removed
    s_type: np.ndarray
    s_bind: np.ndarray
    s_ndx: np.ndarray
    s_value: np.ndarray
    s_size: np.ndarray
    lto: bool = False
    _name_ids: dict[str, int] = field(default_factory=dict, repr=False)

    def name_id(self, name: str) -> int:
        """Id of ``name``, or -1 when no dump or symbol table mentions it."""
        h = hash_strings([name])[0]
        i = int(np.searchsorted(self.name_hash, h))
        return i if i < len(self.name_hash) and self.name_hash[i] == h else -1

    def group_label(self, g: int) -> str:
        """The object (or first dump) a group stands for, for messages."""
        if self.objects[g]:
            return self.objects[g]
        firsts = np.flatnonzero(self.dump_group == g)
        return self.dumps[int(firsts[0])] if len(firsts) else f"group {g}"

    def loc(self, fid: int) -> str:
        """``file:line`` of a function."""
        return f"{self.files[int(self.f_file[fid])]}:{int(self.f_line[fid])}"


def _intern(sources: list[tuple[np.ndarray, np.ndarray, np.ndarray, bytes | bytearray]]) -> tuple[
        np.ndarray, list[np.ndarray], list[str]]:
    """Intern hashes from several buffers at once: (sorted unique hashes, ids per source, strings)."""
    allh = np.concatenate([s[0].ravel() for s in sources])
    uniq, first, inv = np.unique(allh, return_index=True, return_inverse=True)
    bounds = np.cumsum([0] + [s[0].size for s in sources])
    allst = np.concatenate([s[1].ravel() for s in sources])[first].tolist()
    allln = np.concatenate([s[2].ravel() for s in sources])[first].tolist()
    src_of = (np.searchsorted(bounds, first, side="right") - 1).tolist()
    views = [memoryview(s[3]) for s in sources]
    strings = [bytes(views[si][st:st + n]).decode("utf-8", "replace")
               for si, st, n in zip(src_of, allst, allln, strict=True)]
    ids = [inv[bounds[i]:bounds[i + 1]].reshape(s[0].shape) for i, s in enumerate(sources)]
    return uniq, ids, strings


def _numbers(raw: RawDumps, h: np.ndarray, off: np.ndarray, ln: np.ndarray, what: str) -> np.ndarray:
    uniq, ids, strings = _intern([(h, off, ln, raw.data)])
    vals = np.empty(len(strings), np.int64)
    for i, s in enumerate(strings):
        if not s.isdigit():
            j = int(np.flatnonzero(ids[0].ravel() == i)[0])
            raise InputError(f"{raw.locate(int(off.ravel()[j]))}: {what} {s!r} is not a number")
        vals[i] = int(s)
    return vals[ids[0]]


def _pack(cols: list[np.ndarray]) -> np.ndarray:
    """One int64 key per row of small non-negative integer columns (exact, checked)."""
    key = np.zeros(len(cols[0]), np.int64)
    bits = 0
    for c in cols:
        width = max(int(c.max()).bit_length() if len(c) else 1, 1)
        bits += width
        key = (key << width) | c.astype(np.int64)
    if bits > 63:
        raise OverflowError("key too wide")
    return key


def _read_symtabs(objects: list[str]) -> tuple[bytearray, np.ndarray]:
    """All symbol tables as one ``.syms``-format buffer, and the byte offset where each object starts."""
    data = bytearray()
    starts = []
    for obj in objects:
        starts.append(len(data))
        if not obj:
            continue
        p = Path(obj)
        if p.name.endswith(".syms"):
            b = p.read_bytes()
            data += b
            if b and not b.endswith(b"\n"):
                data += b"\n"
        else:
            data += syms_text(read_symbols(p))
    return data, np.array(starts, np.int64)


def build_index(dumps: list[Path], objects: Path | None = None, root: Path | None = None) -> Index:
    """Parse ``dumps`` and their objects' symbol tables into an :class:`Index`."""
    raw = parse_dumps(dumps)
    lto = any(lto_link_of(d) for d in dumps)
    if lto:  # one link: compile-time and link-time decisions chain into each other, so one group
        links = sorted({lto_link_of(d) for d in dumps} - {None}, key=str)
        dump_group = np.zeros(len(dumps), np.int64)
        obj = object_for_dump(dumps[[lto_link_of(d) for d in dumps].index(links[0])], objects, root)
        group_obj = [str(obj) if obj else ""]
    else:
        dump_group = np.arange(len(dumps), dtype=np.int64)
        group_obj = [str(o) if (o := object_for_dump(d, objects, root)) else "" for d in dumps]
    sdata, sstart = _read_symtabs(group_obj)
    try:
        sf = split_fields(sdata, b" ")
    except FieldTooLong as e:
        raise InputError(f"symbol table near byte {e.offset}: not a .syms file") from None
    good = sf.nfields == 6
    if not good.all():
        i = int(np.argmax(~good))
        off = int(sf.start[sf.first[i]])
        g = int(np.searchsorted(sstart, off, side="right")) - 1
        line = sdata.count(b"\n", int(sstart[g]), off) + 1
        raise InputError(f"{group_obj[g]}:{line}: expected 6 columns (value size type bind ndx name), "
                         f"found {int(sf.nfields[i])}")
    srow = sf.first[:, None] + np.arange(6)
    s_hash, s_off, s_len = sf.hash[srow], sf.start[srow], sf.length[srow]
    s_group = np.searchsorted(sstart, s_off[:, 0], side="right") - 1

    name_hash, (c_names, r_names, s_names), names = _intern([
        (raw.c_hash[:, [0, 4]], raw.c_off[:, [0, 4]], raw.c_len[:, [0, 4]], raw.data),
        (raw.r_hash[:, 0], raw.r_off[:, 0], raw.r_len[:, 0], raw.data),
        (s_hash[:, 5], s_off[:, 5], s_len[:, 5], sdata)])
    _, (c_files, r_files), files = _intern([
        (raw.c_hash[:, [1, 5]], raw.c_off[:, [1, 5]], raw.c_len[:, [1, 5]], raw.data),
        (raw.r_hash[:, 1], raw.r_off[:, 1], raw.r_len[:, 1], raw.data)])
    c_num = _numbers(raw, raw.c_hash[:, [2, 3, 6, 7]], raw.c_off[:, [2, 3, 6, 7]], raw.c_len[:, [2, 3, 6, 7]],
                     "line/column")
    r_num = _numbers(raw, raw.r_hash[:, 2:4], raw.r_off[:, 2:4], raw.r_len[:, 2:4], "line/column")
    _, (kid,), ktext = _intern([(raw.c_hash[:, 8], raw.c_off[:, 8], raw.c_len[:, 8], raw.data)])
    kmap = np.array([_KIND_TEXT.get(k, KINDS.index("other")) for k in ktext] or [0], np.int8)
    kind = kmap[kid] if len(kid) else np.zeros(0, np.int8)

    # functions: (name, file, line, col) of both ends of every clone record and of removals
    fn_name = np.concatenate([c_names[:, 0], c_names[:, 1], r_names])
    fn_file = np.concatenate([c_files[:, 0], c_files[:, 1], r_files])
    fn_line = np.concatenate([c_num[:, 0], c_num[:, 2], r_num[:, 0]])
    fn_col = np.concatenate([c_num[:, 1], c_num[:, 3], r_num[:, 1]])
    fkey = _pack([fn_name, fn_file, fn_line, fn_col])
    ukey, ufirst, fid = np.unique(fkey, return_index=True, return_inverse=True)
    rec_group = np.concatenate([dump_group[raw.c_dump], dump_group[raw.c_dump], dump_group[raw.r_dump]])
    nkey = _pack([rec_group, fid])
    unode, nfirst, nid = np.unique(nkey, return_index=True, return_inverse=True)
    nc = len(raw.c_dump)
    src, dst, rm = nid[:nc], nid[nc:2 * nc], nid[2 * nc:]
    n_removed = np.zeros(len(unode), np.bool_)
    n_removed[rm] = True
    ekey = _pack([src, dst, kind.astype(np.int64)])
    uedge, efirst, ecount = np.unique(ekey, return_index=True, return_counts=True)
    e_src, e_dst, e_kind = src[efirst], dst[efirst], kind[efirst]
    order = np.lexsort((e_dst, e_src))
    e_src, e_dst, e_kind, ecount = e_src[order], e_dst[order], e_kind[order], ecount[order]
    e_ptr = np.searchsorted(e_src, np.arange(len(unode) + 1))

    # symbols
    base = np.arange(len(names), dtype=np.int64)
    for i, n in enumerate(names):
        if ".lto_priv." in n:
            j = _name_index(name_hash, _LTO_PRIV.sub("", n))
            if j >= 0:
                base[i] = j
    s_type = _enum(s_hash[:, 2], SYM_TYPES)
    s_bind = _enum(s_hash[:, 3], SYM_BINDS)
    _, (ndx_id, val_id, size_id), small = _intern([
        (s_hash[:, 4], s_off[:, 4], s_len[:, 4], sdata), (s_hash[:, 0], s_off[:, 0], s_len[:, 0], sdata),
        (s_hash[:, 1], s_off[:, 1], s_len[:, 1], sdata)])
    conv = np.array([_int_or(s) for s in small] or [0], np.int64)
    s_ndx, s_value, s_size = conv[ndx_id], conv[val_id], conv[size_id]
    s_base = base[s_names] if len(s_names) else np.zeros(0, np.int64)
    so = np.lexsort((s_base, s_group))
    return Index(
        dumps=[str(d) for d in dumps], objects=group_obj, dump_group=dump_group, names=names,
        name_hash=name_hash, files=files, f_name=fn_name[ufirst], f_file=fn_file[ufirst],
        f_line=fn_line[ufirst], f_col=fn_col[ufirst], n_group=rec_group[nfirst], n_func=fid[nfirst],
        n_removed=n_removed, e_src=e_src, e_dst=e_dst, e_kind=e_kind, e_count=ecount, e_ptr=e_ptr,
        s_group=s_group[so], s_name=s_names[so], s_base=s_base[so], s_type=s_type[so], s_bind=s_bind[so],
        s_ndx=s_ndx[so], s_value=s_value[so], s_size=s_size[so], lto=lto)


def _name_index(name_hash: np.ndarray, name: str) -> int:
    h = hash_strings([name])[0]
    i = int(np.searchsorted(name_hash, h))
    return i if i < len(name_hash) and name_hash[i] == h else -1


def _enum(h: np.ndarray, values: tuple[str, ...]) -> np.ndarray:
    out = np.full(len(h), len(values) - 1, np.int8)
    for i, hv in enumerate(hash_strings(list(values[:-1]))):
        out[h == hv] = i
    return out


def _int_or(s: str) -> int:
    try:
        return int(s, 16) if len(s) >= 8 and not s.startswith("0x") else int(s, 0)
    except ValueError:
        return -1  # ABS, COM, UND section indexes


def _fingerprint(dumps: list[Path], objects: Path | None) -> str:
    h = hashlib.sha256(f"v{_VERSION};{objects}".encode())
    for d in dumps:
        st = d.stat()
        h.update(f"{d};{st.st_size};{st.st_mtime_ns}\n".encode())
        for side in (d.with_name(re.sub(r"\.c\.\d+i\.ipa-clones$", ".o.syms", d.name)),
                     d.with_name(re.sub(r"\.c\.\d+i\.ipa-clones$", ".o", d.name))):
            try:
                s2 = side.stat()
                h.update(f"{side};{s2.st_size};{s2.st_mtime_ns}\n".encode())
            except OSError:
                pass
    return h.hexdigest()


def _save(idx: Index, path: Path, fp: str) -> None:
    arrays: dict[str, np.ndarray] = {"fingerprint": np.frombuffer(fp.encode(), np.uint8)}
    for f in fields(Index):
        v = getattr(idx, f.name)
        if f.name.startswith("_"):
            continue
        if isinstance(v, list):
            arrays[f.name] = np.frombuffer("\0".join(v).encode() + b"\0", np.uint8)
        elif isinstance(v, bool):
            arrays[f.name] = np.array([v])
        else:
            arrays[f.name] = v
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def _load(path: Path, fp: str) -> Index | None:
    try:
        z = np.load(path)
    except (OSError, ValueError):
        return None
    with z:
        if bytes(z["fingerprint"]).decode() != fp:
            return None
        kw: dict[str, object] = {}
        for f in fields(Index):
            if f.name.startswith("_"):
                continue
            a = z[f.name]
            if f.type in ("list[str]",):
                kw[f.name] = bytes(a).decode().split("\0")[:-1]
            elif f.type == "bool":
                kw[f.name] = bool(a[0])
            else:
                kw[f.name] = a
    return Index(**kw)  # type: ignore[arg-type]


def load_index(dumps: list[Path], objects: Path | None = None, root: Path | None = None,
               use_cache: bool = True) -> Index:
    """The index of ``dumps`` from the on-disk cache when no dump or symbol file changed, else built and
    cached. The cache key covers every path, size and mtime.

    >>> idx = load_index(find_dumps("tests/ipa_data/out"))  # doctest: +SKIP
    """
    if not dumps:
        raise InputError("no ipa-clones dumps given")
    if not use_cache:
        return build_index(dumps, objects, root)
    fp = _fingerprint(dumps, objects)
    key = hashlib.sha256(("\n".join(str(d.resolve()) for d in dumps[:1]) + str(len(dumps))
                          + str(objects)).encode()).hexdigest()[:24]
    path = cache_dir() / "impact" / f"{key}.npz"
    idx = _load(path, fp)
    if idx is None:
        idx = build_index(dumps, objects, root)
        try:
            _save(idx, path, fp)
        except OSError:
            pass  # a read-only cache only costs speed
    return idx
