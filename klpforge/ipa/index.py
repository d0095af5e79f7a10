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
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..util.errors import InputError
from ..util.fsutil import cache_dir as _cache_dir
from ..util.fsutil import open_regular
from .dumps import RawDumps, classify, lto_link_of, object_for_dump, objects_for_dumps, parse_dumps, read_files
from .objsyms import read_symbols, syms_text
from .tokens import (
    PAD,
    FieldTooLong,
    StrTable,
    find_seps,
    first_order,
    group,
    hash_strings,
    parse_uint,
    span_hash,
    u64_view,
)

__all__ = ["Index", "StageTimes", "build_index", "load_index", "cache_dir", "KINDS", "SYM_TYPES", "SYM_BINDS"]

#: Edge kinds; anything else GCC writes (simdclone, target clones) is kept as "other".
KINDS = ("inline", "constprop", "isra", "part", "recursion", "other")
SYM_TYPES = ("NOTYPE", "FUNC", "OBJECT", "SECTION", "FILE", "OTHER")
SYM_BINDS = ("LOCAL", "GLOBAL", "WEAK", "OTHER")
_VERSION = 6
_LTO_PRIV = re.compile(r"\.lto_priv\.\d+")


def cache_dir() -> Path:
    """The klpforge cache root (``$KLPFORGE_CACHE``, else ``$XDG_CACHE_HOME/klpforge``, else
    ``~/.cache/klpforge``: :func:`klpforge.util.fsutil.cache_root`), its ``impact/`` directory checked
    to be writable by the user only (:func:`klpforge.util.fsutil.check_private_dir`)."""
    return _cache_dir("impact").parent


@dataclass
class Index:
    """Everything a query needs; every field is a numpy array or a list of strings (see module doc)."""

    dumps: list[str]
    objects: list[str]  # per group: symbol table path, "" when there is none
    dump_group: np.ndarray
    names: StrTable
    name_hash: np.ndarray  # sorted uint64 hash of every name
    name_order: np.ndarray  # name id of each name_hash entry (ids: dump names first, by first appearance)
    files: StrTable
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
    lk_func_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lk_by_base: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lk_by_name: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lk_global: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    lk_at_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lk_at_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    lk_addr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lto: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)  # lookups built by queries

    def name_id(self, name: str) -> int:
        """Id of ``name``, or -1 when no dump or symbol table mentions it."""
        return _name_index(self.name_hash, self.name_order, name)

    def group_label(self, g: int) -> str:
        """The object (or first dump) a group stands for, for messages."""
        if self.objects[g]:
            return self.objects[g]
        firsts = np.flatnonzero(self.dump_group == g)
        return self.dumps[int(firsts[0])] if len(firsts) else f"group {g}"

    def loc(self, fid: int) -> str:
        """``file:line`` of a function."""
        return f"{self.files[int(self.f_file[fid])]}:{int(self.f_line[fid])}"


def _read_symtabs(objects: list[str]) -> tuple[bytearray, np.ndarray]:
    """All symbol tables as one ``.syms``-format buffer (plus padding), and the byte offset where each
    object starts. ``.syms`` files are read in place; ELF objects are converted with pyelftools."""
    if all(not o or o.endswith(".syms") for o in objects):
        real = [o for o in objects if o]
        data, st = read_files(real)
        starts = np.empty(len(objects), np.int64)
        k = 0
        for g, o in enumerate(objects):  # an object without a table starts where the next one does
            starts[g] = st[k] if k < len(real) else len(data) - PAD
            k += bool(o)
        return data, starts
    buf = bytearray()
    offs = []
    for obj in objects:
        offs.append(len(buf))
        if not obj:
            continue
        p = Path(obj)
        if p.name.endswith(".syms"):
            with open_regular(p) as f:
                b = f.read()
            buf += b
            if b and not b.endswith(b"\n"):
                buf += b"\n"
        else:
            buf += syms_text(read_symbols(p))
    return buf + bytes(PAD), np.array(offs, np.int64)


@dataclass
class _Syms:
    group: np.ndarray
    name_hash: np.ndarray
    name_start: np.ndarray
    name_end: np.ndarray
    type: np.ndarray
    bind: np.ndarray
    ndx: np.ndarray
    value: np.ndarray
    size: np.ndarray


def _parse_symtabs(data: bytearray, starts: np.ndarray, group_obj: list[str]) -> _Syms:
    """Split the ``value size type bind ndx name`` lines; FILE and SECTION symbols are dropped (no query
    looks at them)."""
    text_end = len(data) - PAD
    words = u64_view(data)
    found: list[np.ndarray] = []
    sp = find_seps(data, b" ", text_end, found)
    nl = found[0]
    first = np.empty(len(nl), np.int64)
    first[:1] = 0
    first[1:] = nl[:-1] + 1
    nf = nl - first + 1
    lstart = np.empty(len(nl), np.int64)
    lstart[:1] = 0
    lstart[1:] = sp[nl[:-1]] + 1
    good = nf == 6
    if not good.all():
        i = int(np.argmax(~good))
        off = int(lstart[i])
        g = int(np.searchsorted(starts, off, side="right")) - 1
        line = data.count(b"\n", int(starts[g]), off) + 1
        raise InputError(f"{group_obj[g]}:{line}: expected 6 columns (value size type bind ndx name), "
                         f"found {int(nf[i])}")
    def col(k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (start, end) of column k
        f = first[rows]
        return (lstart[rows] if k == 0 else sp[f + (k - 1)] + 1), sp[f + k]

    allrows = np.arange(len(nl))
    typ = classify(words, *col(2, allrows), [t.encode() for t in SYM_TYPES[:-1]])
    keep = np.flatnonzero((typ != SYM_TYPES.index("FILE")) & (typ != SYM_TYPES.index("SECTION")))
    typ = typ[keep]
    bind = classify(words, *col(3, keep), [t.encode() for t in SYM_BINDS[:-1]])
    # numbers matter only for functions (aliases at one address); -1 elsewhere, as for ABS/COM/UND
    fn = keep[typ == SYM_TYPES.index("FUNC")]
    isfn = typ == SYM_TYPES.index("FUNC")
    ndx = np.full(len(keep), -1, np.int64)
    value = np.full(len(keep), -1, np.int64)
    size = np.full(len(keep), -1, np.int64)
    for arr, k, base in ((ndx, 4, 10), (value, 0, 16), (size, 1, 10)):
        v, ok = parse_uint(data, *col(k, fn), base)
        v[~ok] = -1
        arr[isfn] = v
    ns, ne = col(5, keep)
    grp = np.repeat(np.arange(len(starts), dtype=np.int64),
                    np.diff(np.append(np.searchsorted(lstart, starts), len(lstart))))[keep]
    return _Syms(grp, span_hash(words, ns, ne), ns, ne, typ, bind, ndx, value, size)


@dataclass
class _DumpTables:
    """Everything the index needs from the dumps, so the dump text can be freed before symbols are read."""

    f_line: np.ndarray
    f_col: np.ndarray
    f_file: np.ndarray
    files: StrTable
    f_name: np.ndarray  # id into names (distinct function names, by first appearance)
    names: StrTable
    name_hash: np.ndarray  # hash of each of names
    n_group: np.ndarray
    n_func: np.ndarray
    n_removed: np.ndarray
    e_src: np.ndarray
    e_dst: np.ndarray
    e_kind: np.ndarray
    e_count: np.ndarray
    e_ptr: np.ndarray


def _dump_tables(raw: RawDumps, dump_group: np.ndarray) -> _DumpTables:
    """Functions, nodes and edges of the parsed dumps. Nodes and functions are numbered in order of first
    mention, so the numbering (and the order of results) does not depend on the hash function."""
    # every mention of a function: both ends of each clone record, then each removal
    nc = len(raw.c_dump)
    men = np.concatenate([raw.c_orig, raw.c_new, raw.r_func]).astype(np.int64)
    mdump = np.concatenate([raw.c_dump, raw.c_dump, raw.r_dump])
    unit, unit_men = _units(raw, men, mdump)
    try:
        fh = raw.func_hash(men[unit_men])  # one hash per unit, not per mention
    except FieldTooLong as e:
        raise InputError(f"{raw.locate(e.offset)}: field too long for an ipa-clones dump") from None
    ugroup = dump_group[mdump[unit_men]]
    # nodes = (group, function); units are in order of first mention, so nodes are too
    with np.errstate(over="ignore"):
        nkey = fh ^ ((ugroup.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    _, nfirst, ninv = group(nkey)
    renum = first_order(nfirst, len(unit_men))
    unit_node = renum[ninv]
    nrep_u = np.empty(len(nfirst), np.int64)  # first unit of each node
    nrep_u[renum] = nfirst
    nid = unit_node[unit]
    del nkey, ninv, renum, unit, unit_node
    # functions = (name, file, line, col)
    _, ffirst, finv = group(fh[nrep_u])
    frenum = first_order(ffirst, len(nrep_u))
    n_func = frenum[finv]
    frep = np.empty(len(ffirst), np.int64)
    frep[frenum] = nrep_u[ffirst]  # first unit of each function
    fmen = men[unit_men[frep]]
    n_group = ugroup[nrep_u]
    src, dst = nid[:nc], nid[nc:2 * nc]
    n_removed = np.zeros(len(nrep_u), np.bool_)
    n_removed[nid[2 * nc:]] = True
    del nid, men, mdump, fh, ugroup

    # function fields, decoded from the first mention only
    fs, fe, le, ce = raw.loc_spans(fmen)
    f_line, ok1 = parse_uint(raw.data, fe + 1, le)
    f_col, ok2 = parse_uint(raw.data, le + 1, ce)
    if not (ok1 & ok2).all():
        i = int(np.argmax(~(ok1 & ok2)))
        bad_s, bad_e = (fe[i] + 1, le[i]) if not ok1[i] else (le[i] + 1, ce[i])
        text = raw.data[int(bad_s):int(bad_e)].decode("utf-8", "replace")
        raise InputError(f"{raw.locate(int(bad_s))}: line/column {text!r} is not a number")
    words = u64_view(raw.data)
    _, ffile_first, f_file = group(span_hash(words, fs, fe))
    files = StrTable.from_spans(raw.data, fs[ffile_first], fe[ffile_first])
    ns, ne = raw.name_span(fmen)
    nh, nfirst, ninv = group(span_hash(words, ns, ne))
    nm_id = first_order(nfirst, len(fmen))
    nm_rep = np.empty(len(nfirst), np.int64)
    nm_rep[nm_id] = nfirst
    names = StrTable.from_spans(raw.data, ns[nm_rep], ne[nm_rep])
    name_hash = np.empty(len(nh), np.uint64)
    name_hash[nm_id] = nh

    # edges: (src, dst, kind) deduplicated with counts, sorted by (src, dst): CSR by src
    nn = len(nrep_u)
    bits = max(nn.bit_length(), 1)
    ekey = (src.astype(np.uint64) << np.uint64(bits + 3)) | (dst.astype(np.uint64) << np.uint64(3)) \
        | raw.c_kind.astype(np.uint64)
    ekey.sort()
    new = np.empty(len(ekey), np.bool_)
    new[:1] = True
    np.not_equal(ekey[1:], ekey[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    e_count = np.diff(np.append(starts, len(ekey))).astype(np.int32)
    ekey = ekey[starts]
    e_src = (ekey >> np.uint64(bits + 3)).astype(np.int32)
    e_dst = ((ekey >> np.uint64(3)) & np.uint64((1 << bits) - 1)).astype(np.int32)
    e_kind = (ekey & np.uint64(7)).astype(np.int8)
    e_ptr = np.zeros(nn + 1, np.int64)
    np.cumsum(np.bincount(e_src, minlength=nn), out=e_ptr[1:])
    i32 = np.int32
    return _DumpTables(f_line.astype(i32), f_col.astype(i32), f_file.astype(i32), files,
                       nm_id[ninv].astype(i32), names, name_hash, n_group.astype(i32), n_func.astype(i32),
                       n_removed, e_src, e_dst, e_kind, e_count, e_ptr)


def _units(raw: RawDumps, men: np.ndarray, mdump: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group mentions that are certainly the same function, cheaply: same dump and same ORDER number.

    ORDER is never used as an identity (it differs between units and is not stable), only to avoid
    hashing the same (name, file, line, col) text again: GCC's symtab order counter is never reused
    within one compilation, so one (dump, order) is one cgraph node with one declaration. Every mention is
    still checked against its unit's first mention (the length of its text); one that differs becomes a unit
    of its own and is hashed in full.

    Returns (unit of each mention, mention index of each unit's first mention); units are numbered in
    order of first mention.
    """
    # units come numbered per batch (parse_dumps): renumber them in order of first mention
    rank = first_order(raw.u_men, len(men))
    unit = rank[raw.m_unit]
    unit_men = np.empty(len(raw.u_men), np.int64)
    unit_men[rank] = raw.u_men
    return unit, unit_men


class StageTimes:
    """CPU and wall seconds per build stage, kept for the last build (``bench/bench_impact.py`` prints them).

    >>> t = StageTimes(); t.lap("x"); list(t.laps)
    ['x']
    """

    last: StageTimes | None = None

    def __init__(self) -> None:
        self.laps: dict[str, tuple[float, float]] = {}
        self._t = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        """Close the stage ``name``."""
        now = (time.perf_counter(), time.process_time())
        self.laps[name] = (now[0] - self._t[0], now[1] - self._t[1])
        self._t = now


def build_index(dumps: list[Path], objects: Path | None = None, root: Path | None = None) -> Index:
    """Parse ``dumps`` and their objects' symbol tables into an :class:`Index`."""
    st = StageTimes.last = StageTimes()
    lto = any(lto_link_of(d) for d in dumps)
    if lto:  # one link: compile-time and link-time decisions chain into each other, so one group
        links = sorted({lto_link_of(d) for d in dumps} - {None}, key=str)
        dump_group = np.zeros(len(dumps), np.int64)
        obj = object_for_dump(dumps[[lto_link_of(d) for d in dumps].index(links[0])], objects, root)
        group_obj = [str(obj) if obj else ""]
    else:
        dump_group = np.arange(len(dumps), dtype=np.int64)
        group_obj = [os.fspath(o) if o else "" for o in objects_for_dumps(dumps, objects, root)]
    st.lap("find objects")
    raw = parse_dumps(dumps)
    st.lap("read + split dumps")
    dt = _dump_tables(raw, dump_group)
    del raw  # the dump text is freed here
    st.lap("functions, nodes, edges")

    # symbols; their names join the function names (ids of function names stay as they are)
    sdata, sstart = _read_symtabs(group_obj)
    st.lap("read symbol tables")
    sy = _parse_symtabs(sdata, sstart, group_obj)
    k0 = len(dt.names)
    allh = np.concatenate([dt.name_hash, sy.name_hash])
    name_hash, nmfirst, nminv = group(allh)
    del allh
    nm_id = first_order(nmfirst, len(nminv))  # function names are distinct and first: ids 0..k0-1 kept
    nm_rep = np.empty(len(nmfirst), np.int64)
    nm_rep[nm_id] = nmfirst
    srow = nm_rep[k0:] - k0
    extra = StrTable.from_spans(sdata, sy.name_start[srow], sy.name_end[srow])
    names = StrTable(dt.names.blob + extra.blob, np.concatenate([dt.names.ends, extra.ends + len(dt.names.blob)]))
    del sdata
    s_names = nm_id[nminv[k0:]]
    s_base = _lto_base(names, name_hash, nm_id)[s_names] if len(s_names) else np.zeros(0, np.int64)
    so = np.lexsort((s_base, sy.group))
    i32 = np.int32
    st.lap("split symbols, names")
    idx = Index(
        dumps=[str(d) for d in dumps], objects=group_obj, dump_group=dump_group, names=names,
        name_hash=name_hash, name_order=nm_id.astype(i32), files=dt.files, f_name=dt.f_name,
        f_file=dt.f_file, f_line=dt.f_line, f_col=dt.f_col, n_group=dt.n_group, n_func=dt.n_func,
        n_removed=dt.n_removed, e_src=dt.e_src, e_dst=dt.e_dst, e_kind=dt.e_kind, e_count=dt.e_count,
        e_ptr=dt.e_ptr, s_group=sy.group[so].astype(i32), s_name=s_names[so].astype(i32),
        s_base=s_base[so].astype(i32), s_type=sy.type[so], s_bind=sy.bind[so], s_ndx=sy.ndx[so].astype(i32),
        s_value=sy.value[so], s_size=sy.size[so], lto=lto)
    for k, v in lookup_arrays(len(names), sy.group[so], s_names[so], s_base[so], sy.type[so], sy.bind[so],
                              sy.ndx[so], sy.value[so]).items():
        setattr(idx, k, v)
    return idx


def lookup_arrays(nnames: int, group: np.ndarray, name: np.ndarray, base: np.ndarray, typ: np.ndarray,
                  bind: np.ndarray, ndx: np.ndarray, value: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted keys over the FUNC symbols (given sorted by (group, base)) that queries search, so a warm
    query does no sorting: ``lk_*`` fields of :class:`Index`.

    >>> sorted(lookup_arrays(1, *(np.zeros(1, np.int64) for _ in range(7))))
    ['lk_addr', 'lk_at_ptr', 'lk_at_rows', 'lk_by_base', 'lk_by_name', 'lk_func_rows', 'lk_global']
    """
    func = np.flatnonzero(typ == SYM_TYPES.index("FUNC"))
    g = group[func].astype(np.int64) << 32
    glob = np.zeros(nnames, np.bool_)
    glob[base[bind != SYM_BINDS.index("LOCAL")]] = True
    # address id of each FUNC symbol: equal (group, section, value) = one address (ICF aliases share it)
    at = func[np.lexsort((value[func], ndx[func], group[func]))]
    new = np.ones(len(at), np.bool_)
    new[1:] = (group[at][1:] != group[at][:-1]) | (ndx[at][1:] != ndx[at][:-1]) | (value[at][1:] != value[at][:-1])
    addr = np.full(len(group), -1, np.int64)
    addr[at] = np.cumsum(new) - 1
    return {"lk_func_rows": func, "lk_by_base": g | base[func].astype(np.int64),
            "lk_by_name": np.sort(g | name[func].astype(np.int64)), "lk_global": glob,
            "lk_at_rows": at, "lk_at_ptr": np.append(np.flatnonzero(new), len(at)), "lk_addr": addr}


def _lto_base(names: StrTable, name_hash: np.ndarray, name_order: np.ndarray) -> np.ndarray:
    """Name id of each name with ``.lto_priv.N`` removed (itself when there is none or no such name)."""
    base = np.arange(len(names), dtype=np.int64)
    blob = names.blob
    at = blob.find(b".lto_priv.")
    while at >= 0:  # only names of LTO builds have it: a short loop
        i = int(np.searchsorted(names.ends, at, side="right"))
        n = names[i]
        j = _name_index(name_hash, name_order, _LTO_PRIV.sub("", n))
        if j >= 0:
            base[i] = j
        at = blob.find(b".lto_priv.", int(names.ends[i]))
    return base


def _name_index(name_hash: np.ndarray, name_order: np.ndarray, name: str) -> int:
    h = hash_strings([name])[0]
    i = int(np.searchsorted(name_hash, h))
    return int(name_order[i]) if i < len(name_hash) and name_hash[i] == h else -1


def _fingerprint(dumps: list[Path], objects: Path | None) -> str:
    h = hashlib.sha256(f"v{_VERSION};{objects}".encode())
    parts = []
    for d in dumps:
        ds = os.fspath(d)
        st = os.stat(ds)
        parts.append(f"{ds};{st.st_size};{st.st_mtime_ns}\n")
        stem = _DUMP_C.sub("", ds)
        if stem != ds:
            for side in (stem + ".o.syms", stem + ".o"):  # the first that exists is the one used
                try:
                    s2 = os.stat(side)
                except OSError:
                    continue
                parts.append(f"{side};{s2.st_size};{s2.st_mtime_ns}\n")
                break
    h.update("".join(parts).encode())
    return h.hexdigest()


_DUMP_C = re.compile(r"\.c\.\d+i\.ipa-clones$")


def _save(idx: Index, path: Path, fp: str) -> None:
    arrays: dict[str, np.ndarray] = {"fingerprint": np.frombuffer(fp.encode(), np.uint8)}
    for f in fields(Index):
        v = getattr(idx, f.name)
        if f.name.startswith("_"):
            continue
        if isinstance(v, StrTable):
            arrays[f.name] = np.frombuffer(v.blob, np.uint8)
            arrays[f.name + "__ends"] = v.ends
        elif isinstance(v, list):
            arrays[f.name] = np.frombuffer("\0".join(v).encode() + b"\0", np.uint8)
        elif isinstance(v, bool):
            arrays[f.name] = np.array([v])
        else:
            arrays[f.name] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path, fp: str) -> Index | None:
    try:
        z = np.load(path)
    except (OSError, ValueError):
        return None
    with z:
        try:
            if bytes(z["fingerprint"]).decode() != fp:
                return None
            kw: dict[str, object] = {}
            for f in fields(Index):
                if f.name.startswith("_"):
                    continue
                a = z[f.name]
                if f.type == "StrTable":
                    kw[f.name] = StrTable(a.tobytes(), z[f.name + "__ends"])
                elif f.type in ("list[str]",):
                    kw[f.name] = bytes(a).decode().split("\0")[:-1]
                elif f.type == "bool":
                    kw[f.name] = bool(a[0])
                else:
                    kw[f.name] = a
        except (KeyError, ValueError, OSError):
            return None  # a cache file from another version
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
