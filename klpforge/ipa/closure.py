"""Which functions must a live patch replace: the closure of the changed functions over inlining and
cloning, checked against the objects' symbol tables.

>>> res = impact(idx, ["helper"])  # doctest: +SKIP
>>> sorted(res.functions)  # doctest: +SKIP
['caller_a', 'caller_b']
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..util.errors import InputError
from .index import KINDS, SYM_BINDS, SYM_TYPES, Index
from .objsyms import reloc_callers
from .tokens import hash_strings

__all__ = ["Step", "Chain", "Entry", "ImpactResult", "impact", "MODES", "closure_all"]

#: What each ``-flive-patching`` mode turns off, as edge kinds (``inline-global``: inlining of a function
#: that is visible outside its unit).
MODES = {
    "O2": frozenset(),
    "inline-clone": frozenset({"icf"}),
    "inline-only-static": frozenset({"icf", "constprop", "isra", "part", "caller-of-clone", "inline-global"}),
}
_FUNC = SYM_TYPES.index("FUNC")
_LOCAL = SYM_BINDS.index("LOCAL")


@dataclass(frozen=True)
class Step:
    """One reason: ``src`` (at ``src_loc``) reached ``dst`` by ``kind`` (inline, constprop, isra, part,
    recursion, cold, alias, icf, lto_priv, caller-of-clone)."""

    kind: str
    src: str
    src_loc: str
    dst: str
    dst_loc: str

    def text(self) -> str:
        """``helper`` inlined into ``caller_a`` (x.c:29)"""
        verb = {"inline": "inlined into", "inline-global": "inlined into", "constprop": "IPA-CP clone",
                "isra": "IPA-SRA clone", "part": "split (partial inlining) into", "recursion":
                "recursion clone", "cold": "has cold part", "alias": "has alias", "icf":
                "folded (ICF) with", "caller-of-clone": "is called by", "lto_priv": "renamed by LTO to",
                "other": "cloned into"}.get(self.kind, self.kind)
        return f"`{self.src}` {verb} `{self.dst}` ({self.dst_loc})"


class Chain:
    """The reasons a function is reached, as a persistent list: one :class:`Step` and the chain it extends.

    Every function reached through ``p`` shares ``p``'s chain instead of copying it, so the chains of a
    closure take memory linear in the number of functions, not in the sum of their depths (a 10,000-deep
    inlining chain copied per function was 50 million steps, 8 GB). It reads like a ``list[Step]``:
    ``len`` and ``[-1]`` in O(1), iteration and other indexes rebuild the list in O(depth); ``kinds`` (the
    set of step kinds) is kept per node, interned, so ``transforms`` costs O(1) too.

    >>> c = Chain() + [Step("inline", "a", "x.c:1", "b", "x.c:2")]
    >>> len(c), c[-1].dst, [s.kind for s in c], sorted(c.kinds)
    (1, 'b', ['inline'], ['inline'])
    """

    __slots__ = ("step", "parent", "length", "kinds")
    step: Step | None
    parent: Chain | None
    length: int
    kinds: frozenset[str]
    _kinds: ClassVar[dict[tuple[frozenset[str], str], frozenset[str]]] = {}

    def __init__(self, step: Step | None = None, parent: Chain | None = None):
        self.step = step
        self.parent = parent if parent is not None and parent.length else None
        base = self.parent.kinds if self.parent is not None else frozenset()
        self.length = 0 if step is None else (self.parent.length if self.parent is not None else 0) + 1
        if step is None:
            self.kinds = frozenset()
        else:
            key = (base, step.kind)
            self.kinds = Chain._kinds.get(key) or Chain._kinds.setdefault(key, base | {step.kind})

    def __add__(self, steps: list[Step]) -> Chain:
        c = self
        for st in steps:
            c = Chain(st, c)
        return c

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def steps(self) -> list[Step]:
        """The steps, first (the seed's) to last."""
        out: list[Step] = []
        c: Chain | None = self
        while c is not None and c.step is not None:
            out.append(c.step)
            c = c.parent
        out.reverse()
        return out

    def tail(self, n: int) -> list[Step]:
        """The last ``n`` steps (O(n), whatever the depth)."""
        out: list[Step] = []
        c: Chain | None = self
        while c is not None and c.step is not None and len(out) < n:
            out.append(c.step)
            c = c.parent
        out.reverse()
        return out

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps())

    def __getitem__(self, k: int) -> Step:
        if k == -1 and self.step is not None:
            return self.step
        return self.steps()[k]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chain):
            return self.length == other.length and self.steps() == other.steps()
        if isinstance(other, list):
            return self.steps() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Chain({self.steps()!r})"


@dataclass
class Entry:
    """A function reached by the closure; ``status`` is ``replace`` (its symbol exists), ``removed``
    (GCC recorded its removal), ``missing`` (no symbol and no removal record) or ``unknown`` (no symbol
    table for its object)."""

    name: str
    loc: str
    obj: str
    status: str
    chain: Chain
    transforms: list[str]
    avoided_by: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    #: other functions at the same address (GCC's identical code folding): separate functions that share
    #: one body, not pieces of this one; replacing either redirects both
    folded: list[str] = field(default_factory=list)


@dataclass
class ImpactResult:
    """Result of :func:`impact`: ``functions`` is the set of symbol names to replace."""

    queries: list[str]
    entries: list[Entry]
    notes: list[str]

    @property
    def functions(self) -> set[str]:
        """Names of the functions the live patch must replace."""
        return {e.name for e in self.entries if e.status == "replace"}

    def reasons(self, name: str) -> list[Entry]:
        """Entries (one per object) for function ``name``."""
        return [e for e in self.entries if e.name == name]


def _parse_query(q: str) -> tuple[str | None, str]:
    if ":" in q:
        f, n = q.rsplit(":", 1)
        return f, n
    return None, q


def _seed_nodes(idx: Index, q: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Nodes named by query ``q``, and (group, symbol row) of same-named functions in symbol tables only."""
    fname, name = _parse_query(q)
    nid = idx.name_id(name)
    if nid < 0:
        return [], []
    fids = np.flatnonzero(idx.f_name == nid)
    if fname is not None:
        keep = [f for f in fids.tolist() if _file_match(idx.files[int(idx.f_file[f])], fname)]
        fids = np.array(keep, np.int64)
    nodes = np.flatnonzero(np.isin(idx.n_func, fids)).tolist()
    groups_with_node = set(idx.n_group[nodes].tolist())
    rows = np.flatnonzero((idx.s_base == nid) & (idx.s_type == _FUNC)).tolist()
    extra = []
    for r in rows:
        g = int(idx.s_group[r])
        if g in groups_with_node:
            continue
        if fname is not None and not any(_file_match(d, fname) for d in _group_dumps(idx, g)):
            continue
        extra.append((g, r))
    return nodes, extra


def _group_dumps(idx: Index, g: int) -> list[str]:
    return [idx.dumps[i] for i in np.flatnonzero(idx.dump_group == g).tolist()]


def _file_match(path: str, want: str) -> bool:
    p = path.removeprefix("./")
    return p == want or p.endswith("/" + want) or p.split(".c.", 1)[0].endswith(want.removesuffix(".c"))


class _Lookups:
    """Sorted symbol keys for vectorised lookups (built with the index, see ``index.lookup_arrays``) and
    memoised decoded strings."""

    def __init__(self, idx: Index):
        self.func_rows = idx.lk_func_rows  # FUNC symbol rows, by (group, base name)
        self.by_base = idx.lk_by_base  # (group << 32 | base name id) of those rows: sorted
        self.by_name = idx.lk_by_name  # (group << 32 | name id) of FUNC symbols: sorted
        self.is_global = idx.lk_global  # per name id: some symbol of that base name is not LOCAL
        self.at_rows = idx.lk_at_rows  # FUNC rows sorted by address (group, section, value)
        self.at_ptr = idx.lk_at_ptr  # rows of address a: at_rows[at_ptr[a]:at_ptr[a + 1]]
        self.addr = idx.lk_addr  # address id of each symbol row (-1: not a function)
        self.names: dict[int, str] = {}
        self.locs: dict[int, str] = {}

    def name(self, idx: Index, i: int) -> str:
        """Decoded name ``i`` (memoised)."""
        s = self.names.get(i)
        if s is None:
            s = self.names[i] = idx.names[i]
        return s

    def loc(self, idx: Index, fid: int) -> str:
        """``file:line`` of function ``fid`` (memoised)."""
        s = self.locs.get(fid)
        if s is None:
            s = self.locs[fid] = idx.loc(fid)
        return s


def _lookups(idx: Index) -> _Lookups:
    lk = idx._cache.get("lookups")
    if lk is None:
        lk = idx._cache["lookups"] = _Lookups(idx)
    assert isinstance(lk, _Lookups)
    return lk


def _decode(idx: Index, lk: _Lookups, ids: list[int]) -> list[str]:
    """Name strings for a list of name ids (-1 gives ""), each distinct id decoded once."""
    memo = lk.names
    out = []
    for i in ids:
        s = memo.get(i)
        if s is None:
            s = memo[i] = idx.names[i] if i >= 0 else ""
        out.append(s)
    return out


def _syms_of(idx: Index, g: int) -> tuple[int, int]:
    lo = int(np.searchsorted(idx.s_group, np.int32(g), side="left"))
    hi = int(np.searchsorted(idx.s_group, np.int32(g), side="right"))
    return lo, hi


def _find_sym(idx: Index, g: int, name_id: int) -> list[int]:
    """Rows of FUNC symbols in group ``g`` whose name (without .lto_priv.N) has id ``name_id``."""
    lk = _lookups(idx)
    k = np.int64((g << 32) | name_id)
    a, b = np.searchsorted(lk.by_base, [k, k + 1])
    return lk.func_rows[a:b].tolist()


def _is_global(idx: Index, name_id: int) -> bool:
    return bool(_lookups(idx).is_global[name_id])


#: edge label codes: KINDS, then 6 = inlining of a function visible outside its unit
_LABELS = (*KINDS, "inline-global")


def _reach(idx: Index, seeds: list[int], skip: frozenset[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breadth-first closure over nodes, one vectorised step per level: (nodes in discovery order, parent
    node of each (-1 for seeds), edge label code of each). Same result as a queue-based BFS: within a
    level, frontier nodes and their edges are taken in order and the first discovery wins."""
    lk = _lookups(idx)
    nn = len(idx.n_group)
    skip_codes = np.array([i for i, k in enumerate(_LABELS) if k in skip], np.int8)
    seen = np.zeros(nn, np.bool_)
    first = np.asarray(list(dict.fromkeys(seeds)), np.int64)
    seen[first] = True
    out_n, out_p, out_k = [first], [np.full(len(first), -1, np.int64)], [np.full(len(first), -1, np.int8)]
    frontier = first
    while len(frontier):
        pos, cnt = _ranges(idx.e_ptr, frontier)
        par = np.repeat(frontier, cnt)
        dst = idx.e_dst[pos].astype(np.int64)
        lab = idx.e_kind[pos].astype(np.int8)
        inl = np.flatnonzero(lab == 0)
        lab[inl[lk.is_global[idx.f_name[idx.n_func[par[inl]]]]]] = 6
        ok = ~seen[dst]
        if len(skip_codes):
            ok &= ~np.isin(lab, skip_codes)
        sel = np.flatnonzero(ok)
        dst, par, lab = dst[sel], par[sel], lab[sel]
        _, firsti = np.unique(dst, return_index=True)
        firsti.sort()  # first discovery of each node, in discovery order
        frontier = dst[firsti]
        seen[frontier] = True
        out_n.append(frontier)
        out_p.append(par[firsti])
        out_k.append(lab[firsti])
    return np.concatenate(out_n), np.concatenate(out_p), np.concatenate(out_k)


def impact(idx: Index, queries: list[str], with_callers: bool = True) -> ImpactResult:
    """Closure of the functions named in ``queries`` (``name`` or ``file.c:name``).

    Raises :class:`InputError` when a query names no function in any dump or symbol table.
    """
    notes: list[str] = []
    seeds: list[int] = []
    sym_only: list[tuple[int, int]] = []
    for q in queries:
        nodes, extra = _seed_nodes(idx, q)
        if not nodes and not extra:
            raise InputError(f"{q}: no function of that name in any ipa-clones dump or symbol table "
                             f"({len(idx.dumps)} dumps)")
        seeds += nodes
        sym_only += extra
    lk = _lookups(idx)
    # modes with the same effective edge filter share one walk (no edge is labelled "icf")
    walks: dict[frozenset[int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    in_mode: dict[str, np.ndarray] = {}
    nn = len(idx.n_group)
    for m, skip in MODES.items():
        key = frozenset(i for i, k in enumerate(_LABELS) if k in skip)
        if key not in walks:
            walks[key] = _reach(idx, seeds, skip)
        mask = np.zeros(nn, np.bool_)
        mask[walks[key][0]] = True
        in_mode[m] = mask
    reached, parents, labels = walks[frozenset()]
    fids = idx.n_func[reached].astype(np.int64)
    name_ids = idx.f_name[fids].astype(np.int64)
    groups = idx.n_group[reached].astype(np.int64)
    # first FUNC symbol row of each reached node's (group, base name), -1 when none
    k = (groups << 32) | name_ids
    at = np.searchsorted(lk.by_base, k)
    hit = at < len(lk.by_base)
    hit[hit] = lk.by_base[at[hit]] == k[hit]
    rows = np.full(len(k), -1, np.int64)
    rows[hit] = lk.func_rows[at[hit]]
    has_obj = np.array([bool(o) for o in idx.objects], np.bool_)[groups] if len(groups) else np.zeros(0, bool)
    status = np.where(~has_obj, "unknown", np.where(rows >= 0, "replace",
                                                    np.where(idx.n_removed[reached], "removed", "missing")))
    avoided = {m: ~in_mode[m][reached] for m in MODES if m != "O2"}
    chains: dict[int, Chain] = {}  # per node: shared with the nodes reached through it
    pos_of = {n: i for i, n in enumerate(reached.tolist())}
    entries: list[Entry] = []
    want_pieces: list[tuple[int, int, int, str]] = []
    callers_wanted: dict[int, list[tuple[str, Entry]]] = {}
    nodes_l, parents_l, labels_l = reached.tolist(), parents.tolist(), labels.tolist()
    # strings decoded once per distinct id, into plain lists indexed like the reached nodes
    names_l = _decode(idx, lk, name_ids.tolist())
    rows_l = rows.tolist()
    sym_l = _decode(idx, lk, [int(idx.s_name[r]) if r >= 0 else -1 for r in rows_l])
    fids_l = fids.tolist()
    locs_l = [lk.loc(idx, f) for f in fids_l]
    groups_l = groups.tolist()
    status_l = status.tolist()
    labels_txt = {g: idx.group_label(g) for g in set(groups_l)}
    avoided_l = [[m for m in avoided if avoided[m][i]] for i in range(len(nodes_l))] if avoided else None
    for i, n in enumerate(nodes_l):
        p = parents_l[i]
        if p < 0:
            chain = Chain()
        else:
            j = pos_of[p]
            chain = Chain(Step(_LABELS[labels_l[i]], names_l[j], locs_l[j], names_l[i], locs_l[i]), chains[p])
        chains[n] = chain
        g = groups_l[i]
        name = names_l[i]
        r = rows_l[i]
        sym_name = sym_l[i] if r >= 0 else name
        ent = Entry(sym_name, locs_l[i], labels_txt[g], status_l[i], chain, sorted(chain.kinds),
                    avoided_l[i] if avoided_l is not None else [])
        if r >= 0:
            want_pieces.append((len(entries), g, r, sym_name))
            if sym_name != name:
                ent.chain = chain + [Step("lto_priv", name, ent.loc, sym_name, ent.loc)]
        entries.append(ent)
        last = chain[-1].kind if chain else ""
        if ent.status == "replace" and last in ("constprop", "isra", "part", "other"):
            callers_wanted.setdefault(g, []).append((sym_name, ent))
    for g, r in sym_only:
        name = lk.name(idx, int(idx.s_name[r]))
        want_pieces.append((len(entries), g, r, name))
        entries.append(Entry(name, "?", idx.group_label(g), "replace", Chain(), [], [], []))
    for (i, *_), (pieces, folded) in zip(want_pieces, _pieces_many(idx, [w[1:] for w in want_pieces]),
                                         strict=True):
        entries[i].pieces, entries[i].folded = pieces, folded
    if with_callers:
        entries += _clone_callers(idx, callers_wanted, notes)
    seen: set[tuple[str, str]] = set()
    uniq = []
    for e in entries:
        if (e.name, e.obj) not in seen:
            seen.add((e.name, e.obj))
            uniq.append(e)
    return ImpactResult(list(queries), uniq, notes)


def _pieces_many(idx: Index, items: list[tuple[int, int, str]]) -> list[tuple[list[str], list[str]]]:
    """:func:`_pieces` for many (group, symbol row, name) at once: the ``.cold``/``.localalias`` names are
    hashed and looked up in one vectorised step."""
    lk = _lookups(idx)
    if not items:
        return []
    cand = [it[2] + sfx for it in items for sfx in (".cold", ".localalias")]
    h = hash_strings(cand)
    at = np.minimum(np.searchsorted(idx.name_hash, h), max(len(idx.name_hash) - 1, 0))
    known = idx.name_hash[at] == h if len(idx.name_hash) else np.zeros(len(h), np.bool_)
    nid = np.where(known, idx.name_order[at], -1).astype(np.int64)
    g = np.repeat(np.array([it[0] for it in items], np.int64), 2)
    k = (g << 32) | np.maximum(nid, 0)
    j = np.minimum(np.searchsorted(lk.by_name, k), max(len(lk.by_name) - 1, 0))
    present = (nid >= 0) & (lk.by_name[j] == k) if len(lk.by_name) else np.zeros(len(k), np.bool_)
    rows = np.array([it[1] for it in items], np.int64)
    addr = lk.addr[rows]
    shared = (addr >= 0) & (idx.s_ndx[rows] >= 0) & (idx.s_size[rows] > 0)
    shared[shared] = (lk.at_ptr[addr[shared] + 1] - lk.at_ptr[addr[shared]]) > 1
    out = []
    for i, (_, _row, name) in enumerate(items):
        pieces = [cand[2 * i + t] for t in (0, 1) if present[2 * i + t]]
        folded: list[str] = []
        if shared[i]:  # identical code folding: other functions at the same address
            a = int(addr[i])
            for r in sorted(lk.at_rows[lk.at_ptr[a]:lk.at_ptr[a + 1]].tolist()):  # symbol-table order
                other = lk.name(idx, int(idx.s_name[r]))
                if other != name and other not in pieces and other not in folded \
                        and other != name + ".localalias" and other + ".localalias" != name:
                    folded.append(other)
        out.append((pieces, folded))
    return out


def _pieces(idx: Index, g: int, row: int, name: str) -> tuple[list[str], list[str]]:
    """``.cold``/``.localalias`` parts that go with symbol ``row``, and the functions identical code
    folding put at its address (separate functions sharing one body)."""
    return _pieces_many(idx, [(g, row, name)])[0]


def _clone_callers(idx: Index, wanted: dict[int, list[tuple[str, Entry]]], notes: list[str]) -> list[Entry]:
    out: list[Entry] = []
    for g, items in wanted.items():
        obj = idx.objects[g]
        if obj.endswith(".syms"):
            notes.append(f"{obj}: callers of {', '.join(sorted(n for n, _ in items))} not computed "
                         "(a .syms file has no relocations; pass --objects with the ELF objects)")
            continue
        found = reloc_callers(obj, {n for n, _ in items})
        for clone, ent in items:
            for caller in sorted(found.get(clone, ())):
                if caller.startswith(clone.split(".")[0] + ".") and caller.endswith(".cold"):
                    continue
                step = Step("caller-of-clone", clone, ent.loc, caller, obj)
                # the dumps never name a function nothing was inlined into: its object is what we know
                out.append(Entry(caller, f"in {os.path.basename(obj)}", obj, "replace", ent.chain + [step],
                                 sorted(set(ent.transforms) | {"caller-of-clone"}),
                                 [m for m in MODES if m != "O2" and "caller-of-clone" in MODES[m]]))
    return out


def _order_by(ids: np.ndarray, n: int) -> np.ndarray:
    """Stable argsort of ids in ``0..n-1``: the ids and positions packed in one integer and sorted with a
    plain sort, several times faster than ``argsort``.

    >>> _order_by(np.array([2, 0, 2, 1]), 3).tolist()
    [1, 3, 0, 2]
    """
    b = max(1, (len(ids) - 1).bit_length())
    if len(ids) == 0 or (max(n, 1) - 1).bit_length() + b > 62:
        return np.argsort(ids, kind="stable")
    packed = (ids.astype(np.int64) << b) | np.arange(len(ids), dtype=np.int64)
    packed.sort()
    packed &= (1 << b) - 1
    return packed


def _ptr(sorted_ids: np.ndarray, n: int) -> np.ndarray:
    """CSR pointers of sorted ids in ``0..n-1``: items of id ``i`` are ``ptr[i]:ptr[i+1]`` (a count, not a search).

    >>> _ptr(np.array([0, 0, 2]), 3).tolist()
    [0, 2, 2, 3]
    """
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(sorted_ids, minlength=n), out=ptr[1:])
    return ptr


def _ranges(ptr: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``ptr[v]..ptr[v+1]-1`` for every ``v`` in ``nodes``, concatenated; and the count per node."""
    lo = ptr[nodes]
    cnt = ptr[nodes + 1] - lo
    tot = int(cnt.sum())
    pos = np.arange(tot, dtype=np.int64)
    pos += np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
    return pos, cnt


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), np.bool_)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def _scc_reps(nn: int, s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Representative (smallest node id) of each node's strongly connected component.

    Nodes that cannot be on a cycle are peeled off first from both ends (vectorised); Tarjan's algorithm
    then runs in Python over the few thousand that remain (mutually inlined functions, split parts
    inlined back into their original).
    """
    rep = np.arange(nn, dtype=np.int64)
    # sinks upwards (Kahn, touching each edge once), then sources downwards on the small rest
    order = _order_by(d, nn)
    rs = s[order]
    rptr = _ptr(d[order], nn)
    left = np.bincount(s, minlength=nn)
    alive = np.ones(nn, np.bool_)
    frontier = np.flatnonzero(left == 0)
    while len(frontier):
        alive[frontier] = False
        pos, _ = _ranges(rptr, frontier)
        preds = rs[pos]
        left -= np.bincount(preds, minlength=nn)
        cand = _sorted_unique(preds)
        frontier = cand[(left[cand] == 0) & alive[cand]]
    a = alive[s] & alive[d]
    s, d = s[a], d[a]
    while True:
        a = alive[s] & alive[d]
        kill = alive & ((np.bincount(s[a], minlength=nn) == 0) | (np.bincount(d[a], minlength=nn) == 0))
        if not kill.any():
            break
        alive &= ~kill
    a = alive[s] & alive[d]
    if not a.any():
        return rep
    es, ed = s[a], d[a]
    # Tarjan's algorithm (iterative) on the remaining nodes, renumbered 0..k-1, adjacency as lists
    nodes = np.flatnonzero(alive)
    local = np.full(nn, -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    o = _order_by(local[es], len(nodes))
    ls, ld = local[es][o], local[ed][o]
    k = len(nodes)
    ptr = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(ls, minlength=k), out=ptr[1:])
    succ = ld.tolist()
    sp = ptr.tolist()
    index = [-1] * k
    low = [0] * k
    on = [False] * k
    stack: list[int] = []
    comp_of = [-1] * k
    counter = 0
    for root in range(k):
        if index[root] >= 0:
            continue
        work = [(root, sp[root])]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on[root] = True
        while work:
            v, i = work[-1]
            end = sp[v + 1]
            while i < end:
                w = succ[i]
                i += 1
                if index[w] < 0:
                    work[-1] = (v, i)
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on[w] = True
                    work.append((w, sp[w]))
                    break
                if on[w] and index[w] < low[v]:
                    low[v] = index[w]
            else:
                work.pop()
                if low[v] == index[v]:
                    while True:
                        w = stack.pop()
                        on[w] = False
                        comp_of[w] = v
                        if w == v:
                            break
                if work:
                    u = work[-1][0]
                    if low[v] < low[u]:
                        low[u] = low[v]
    comp = np.array(comp_of, np.int64)
    # representative = smallest node id of the component
    first = np.full(k, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, comp, nodes)
    rep[nodes] = first[comp]
    return rep


def _dag_reach(nn: int, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reach of every node of a DAG given as unique edges sorted by (s, d): CSR (ptr, reached nodes).

    Nodes are peeled from the sinks upwards (Kahn's algorithm, one vectorised step per level): a node's
    reach is its successors plus their reaches, which are complete by then.
    """
    sptr = _ptr(s, nn)
    order = _order_by(d, nn)
    rs = s[order]
    rptr = _ptr(d[order], nn)
    left = np.diff(sptr)  # successors not yet done
    rstart = np.zeros(nn, np.int64)
    rlen = np.zeros(nn, np.int64)
    reach = np.empty(max(len(s) * 3, 1024), np.int64)
    used = 0
    done = left == 0
    frontier = np.flatnonzero(done)
    while len(frontier):
        pos, _ = _ranges(rptr, frontier)
        preds = rs[pos]
        left -= np.bincount(preds, minlength=nn)
        cand = _sorted_unique(preds)
        ready = cand[(left[cand] == 0) & ~done[cand]]
        done[ready] = True
        epos, cnt = _ranges(sptr, ready)
        ev, ew = np.repeat(ready, cnt), d[epos]
        xpos, lens = _ranges2(rstart[ew], rlen[ew])
        pk = _sorted_unique(np.concatenate([ev * nn + ew, np.repeat(ev, lens) * nn + reach[xpos]]))
        pv, px = pk // nn, pk % nn
        if used + len(px) > len(reach):
            reach = np.concatenate([reach[:used], np.empty(max(len(reach), len(px)), np.int64)])
        reach[used:used + len(px)] = px
        first = np.searchsorted(pv, ready)
        rstart[ready] = used + first
        rlen[ready] = np.diff(np.append(first, len(pv)))
        used += len(px)
        frontier = ready
    if not done.all():
        raise AssertionError("closure: graph has a cycle after condensation")
    pos, _ = _ranges2(rstart, rlen)
    ptr = np.zeros(nn + 1, np.int64)
    np.cumsum(rlen, out=ptr[1:])
    return ptr, reach[pos]


def _ranges2(lo: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``lo[i]..lo[i]+cnt[i]-1`` for every ``i``, concatenated; and ``cnt``."""
    pos = np.arange(int(cnt.sum()), dtype=np.int64)
    pos += np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
    return pos, cnt


def closure_all(idx: Index) -> tuple[np.ndarray, np.ndarray]:
    """Transitive closure of every node at once: pairs (src node, reached node), sorted. A node reaches
    itself only through a direct self edge (a recursion clone).

    Strongly connected components are contracted (:func:`_scc_reps`), the reach of every node of the
    resulting DAG is computed level by level (:func:`_dag_reach`), then expanded back to members.

    >>> s, d = closure_all(idx)  # doctest: +SKIP
    """
    nn = len(idx.n_group)
    src, dst = idx.e_src.astype(np.int64), idx.e_dst.astype(np.int64)
    loop = src == dst
    self_pairs = src[loop]
    key = _sorted_unique(src[~loop] * nn + dst[~loop])
    s, d = key // nn, key % nn
    rep = _scc_reps(nn, s, d)
    ck = rep[s] * nn + rep[d]
    ck = _sorted_unique(ck[rep[s] != rep[d]])
    ptr, reach = _dag_reach(nn, ck // nn, ck % nn)
    pv = np.repeat(np.arange(nn, dtype=np.int64), np.diff(ptr))
    px = reach
    parts_v, parts_x = [pv], [px]
    big = np.flatnonzero(rep != np.arange(nn))  # members of cycles other than their representative
    if len(big):
        mrep = np.concatenate([rep[big], np.unique(rep[big])])
        mnode = np.concatenate([big, np.unique(rep[big])])
        o = np.lexsort((mnode, mrep))
        mrep, mnode = mrep[o], mnode[o]
        mptr = _ptr(mrep, nn)
        msize = np.diff(mptr)
        # a reached representative stands for all its members
        hit = np.flatnonzero(msize[px] > 0)
        mpos, cnt = _ranges(mptr, px[hit])
        parts_v.append(np.repeat(pv[hit], cnt))
        parts_x.append(mnode[mpos])
        fv = np.concatenate(parts_v)
        fx = np.concatenate(parts_x)
        # members of one component reach each other, and all that their representative reaches
        reps = np.flatnonzero(msize > 0)
        fk = _sorted_unique(fv * nn + fx)
        fv, fx = fk // nn, fk % nn
        fptr = _ptr(fv, nn)
        mpos, mcnt = _ranges(mptr, reps)
        mem, mem_rep = mnode[mpos], np.repeat(reps, mcnt)
        rpos, rcnt = _ranges(fptr, mem_rep)
        parts_v.append(np.repeat(mem, rcnt))
        parts_x.append(fx[rpos])
        inner_pos, icnt = _ranges(mptr, mem_rep)
        parts_v.append(np.repeat(mem, icnt))
        parts_x.append(mnode[inner_pos])
    keys = np.concatenate([v * nn + x for v, x in zip(parts_v, parts_x, strict=True)] + [self_pairs * nn + self_pairs])
    keys = _sorted_unique(keys)
    v, x = keys // nn, keys % nn
    keep = (v != x) | np.isin(v, self_pairs)
    return v[keep], x[keep]
