"""Which functions must a live patch replace: the closure of the changed functions over inlining and
cloning, checked against the objects' symbol tables.

>>> res = impact(idx, ["helper"])  # doctest: +SKIP
>>> sorted(res.functions)  # doctest: +SKIP
['caller_a', 'caller_b']
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .index import KINDS, SYM_BINDS, SYM_TYPES, Index
from .objsyms import reloc_callers

__all__ = ["Step", "Entry", "ImpactResult", "impact", "MODES", "closure_all"]

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


@dataclass
class Entry:
    """A function reached by the closure; ``status`` is ``replace`` (its symbol exists), ``removed``
    (GCC recorded its removal), ``missing`` (no symbol and no removal record) or ``unknown`` (no symbol
    table for its object)."""

    name: str
    loc: str
    obj: str
    status: str
    chain: list[Step]
    transforms: list[str]
    avoided_by: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)


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


def _syms_of(idx: Index, g: int) -> tuple[int, int]:
    lo = int(np.searchsorted(idx.s_group, g, side="left"))
    hi = int(np.searchsorted(idx.s_group, g, side="right"))
    return lo, hi


def _find_sym(idx: Index, g: int, name_id: int) -> list[int]:
    """Rows of FUNC symbols in group ``g`` whose name (without .lto_priv.N) has id ``name_id``."""
    lo, hi = _syms_of(idx, g)
    a = lo + int(np.searchsorted(idx.s_base[lo:hi], name_id, side="left"))
    b = lo + int(np.searchsorted(idx.s_base[lo:hi], name_id, side="right"))
    return [r for r in range(a, b) if idx.s_type[r] == _FUNC]


def _is_global(idx: Index, name_id: int) -> bool:
    rows = np.flatnonzero(idx.s_base == name_id)
    return bool(len(rows)) and bool((idx.s_bind[rows] != _LOCAL).any())


def _edge_kind(idx: Index, k: int, src_name: int) -> str:
    kind = KINDS[k]
    if kind == "inline" and _is_global(idx, src_name):
        return "inline-global"
    return kind


def _reach(idx: Index, seeds: list[int], skip: frozenset[str]) -> dict[int, tuple[int, str] | None]:
    """Breadth-first closure over nodes; value = (parent node, edge kind), None for seeds."""
    parent: dict[int, tuple[int, str] | None] = {s: None for s in seeds}
    todo = deque(seeds)
    gcache: dict[int, bool] = {}
    while todo:
        n = todo.popleft()
        src_name = int(idx.f_name[idx.n_func[n]])
        for e in range(int(idx.e_ptr[n]), int(idx.e_ptr[n + 1])):
            d = int(idx.e_dst[e])
            if d in parent:
                continue
            k = KINDS[int(idx.e_kind[e])]
            if k == "inline":
                if src_name not in gcache:
                    gcache[src_name] = _is_global(idx, src_name)
                k = "inline-global" if gcache[src_name] else "inline"
            if k in skip:
                continue
            parent[d] = (n, k)
            todo.append(d)
    return parent


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
    reach = {m: _reach(idx, seeds, MODES[m]) for m in MODES}
    full = reach["O2"]
    entries: list[Entry] = []
    callers_wanted: dict[int, list[tuple[str, Entry]]] = {}
    for n in full:
        g = int(idx.n_group[n])
        fid = int(idx.n_func[n])
        name_id = int(idx.f_name[fid])
        name = idx.names[name_id]
        chain = _chain(idx, full, n)
        rows = _find_sym(idx, g, name_id)
        if not idx.objects[g]:
            status = "unknown"
        elif rows:
            status = "replace"
        elif idx.n_removed[n]:
            status = "removed"
        else:
            status = "missing"
        sym_name = idx.names[int(idx.s_name[rows[0]])] if rows else name
        ent = Entry(sym_name, idx.loc(fid), idx.group_label(g), status, chain,
                    sorted({s.kind for s in chain}),
                    [m for m in MODES if m != "O2" and n not in reach[m]])
        if rows:
            ent.pieces = _pieces(idx, g, rows[0], sym_name)
            if sym_name != name:
                ent.chain = chain + [Step("lto_priv", name, ent.loc, sym_name, ent.loc)]
        entries.append(ent)
        last = chain[-1].kind if chain else ""
        if status == "replace" and last in ("constprop", "isra", "part", "other"):
            callers_wanted.setdefault(g, []).append((sym_name, ent))
    for g, r in sym_only:
        name = idx.names[int(idx.s_name[r])]
        ent = Entry(name, "?", idx.group_label(g), "replace", [], [], [], _pieces(idx, g, r, name))
        entries.append(ent)
    if with_callers:
        entries += _clone_callers(idx, callers_wanted, notes)
    seen: set[tuple[str, str]] = set()
    uniq = []
    for e in entries:
        if (e.name, e.obj) not in seen:
            seen.add((e.name, e.obj))
            uniq.append(e)
    return ImpactResult(list(queries), uniq, notes)


def _chain(idx: Index, parent: dict[int, tuple[int, str] | None], n: int) -> list[Step]:
    steps: list[Step] = []
    cur = n
    while (p := parent.get(cur)) is not None:
        src, kind = p
        fs, fd = int(idx.n_func[src]), int(idx.n_func[cur])
        steps.append(Step(kind, idx.names[int(idx.f_name[fs])], idx.loc(fs), idx.names[int(idx.f_name[fd])],
                          idx.loc(fd)))
        cur = src
    return steps[::-1]


def _pieces(idx: Index, g: int, row: int, name: str) -> list[str]:
    """``.cold``/``.localalias`` parts and identical-code-folded aliases that go with symbol ``row``."""
    lo, hi = _syms_of(idx, g)
    out = []
    for suffix in (".cold", ".localalias"):
        nid = idx.name_id(name + suffix)
        if nid >= 0 and ((idx.s_name[lo:hi] == nid) & (idx.s_type[lo:hi] == _FUNC)).any():
            out.append(name + suffix)
    ndx, val = int(idx.s_ndx[row]), int(idx.s_value[row])
    if ndx >= 0 and int(idx.s_size[row]) > 0:
        same = np.flatnonzero((idx.s_ndx[lo:hi] == ndx) & (idx.s_value[lo:hi] == val)
                              & (idx.s_type[lo:hi] == _FUNC)) + lo
        for r in same.tolist():
            other = idx.names[int(idx.s_name[r])]
            if other != name and other not in out and other != name + ".localalias":
                out.append(other)
    return out


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
                out.append(Entry(caller, "?", obj, "replace", ent.chain + [step],
                                 sorted(set(ent.transforms) | {"caller-of-clone"}),
                                 [m for m in MODES if m != "O2" and "caller-of-clone" in MODES[m]]))
    return out


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
    alive = np.ones(nn, np.bool_)
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
    succ: dict[int, list[int]] = {}
    for u, v in zip(es.tolist(), ed.tolist(), strict=True):
        succ.setdefault(u, []).append(v)
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on: set[int] = set()
    counter = 0
    for root in np.flatnonzero(alive).tolist():
        if root in index:
            continue
        work = [(root, 0)]
        while work:  # iterative Tarjan
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            nxt = succ.get(v, [])
            while i < len(nxt):
                w = nxt[i]
                i += 1
                if w not in index:
                    work.append((v, i))
                    work.append((w, 0))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    rep[comp] = min(comp)
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
    return rep


def _dag_reach(nn: int, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reach of every node of a DAG given as unique edges sorted by (s, d): CSR (ptr, reached nodes).

    Nodes are peeled from the sinks upwards (Kahn's algorithm, one vectorised step per level): a node's
    reach is its successors plus their reaches, which are complete by then.
    """
    sptr = np.searchsorted(s, np.arange(nn + 1))
    order = np.argsort(d, kind="stable")
    rs = s[order]
    rptr = np.searchsorted(d[order], np.arange(nn + 1))
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
        mptr = np.searchsorted(mrep, np.arange(nn + 1))
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
        fptr = np.searchsorted(fv, np.arange(nn + 1))
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
