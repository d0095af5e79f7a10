"""``klpforge diff --impact DUMPS``: were the functions diff found changed predicted from ``-fdump-ipa-clones``?

Diff sees objects only, so the functions the user edited in the source (the *seeds*) are inferred: a changed
function is a seed unless its base name (``foo`` for ``foo.part.0``) is explained by the prediction of another
changed function's base name (``user1`` changed because ``slow_path`` was inlined into it). The prediction of
every seed (:func:`klpforge.ipa.predict`, restricted to the diffed object) is then compared with what diff
found, both ways.

>>> check_impact(Path("build/"), result)["unpredicted"]  # doctest: +SKIP
[]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from .names import base_function, clone_parent

__all__ = ["check_impact", "summary_lines"]


def _same_object(label: str, orig: Path) -> bool:
    """Whether an impact entry's object (``X.o``, ``X.o.syms`` or the dump) is the diffed object ``orig``."""
    p = Path(label)
    try:
        if p.exists() and orig.exists() and os.path.samefile(p, orig):
            return True
    except OSError:
        pass
    stem = p.name.split(".", 1)[0]
    return stem == orig.name.split(".", 1)[0] and p.parent.resolve() == orig.parent.resolve()


def _patched_names(path: str) -> set[str] | None:
    from ..ipa.objsyms import read_symbols

    try:
        return {s.name for s in read_symbols(path) if s.type == "FUNC"}
    except InputError:
        return None


def _load(dumps: Path, use_cache: bool = True) -> tuple[Any, list[str]]:
    """The impact index of ``dumps`` (DWARF fallback when there are none, as ``klpforge impact`` does)."""
    from ..ipa import find_dumps, load_index

    files = find_dumps(dumps)
    if files:
        return load_index(files, None, dumps if dumps.is_dir() else None, use_cache=use_cache), []
    from ..ipa.dwarf import fallback_index

    idx, note = fallback_index(dumps, None)
    return idx, [note]


def check_impact(dumps: Path, res: Any, use_cache: bool = True) -> dict[str, Any]:
    """Compare ``res.changed`` (a :class:`~klpforge.diff.DiffResult`) with the impact predicted from the dumps.

    Returns a JSON-able dict: ``seeds``; ``changed`` (per changed function: predicted or not, by which seed
    and chain); ``unpredicted`` (with a likely cause); ``predicted_unchanged`` (with the reason the predicted
    copy did not change); ``predicted`` (names); ``notes``. ``use_cache``: keep the index in the user cache
    (off for throw-away builds such as the demo's).
    """
    from ..ipa.closure import Entry, impact

    idx, notes = _load(dumps, use_cache)
    orig = Path(str(res.report.get("orig", "")))
    changed = [c for c in res.changed]
    bases = sorted({base_function(c) for c in changed})

    # prediction of every changed base name, restricted to the diffed object
    preds: dict[str, list[Entry]] = {}
    unknown: list[str] = []
    for b in bases:
        try:
            ents = impact(idx, [b]).entries
        except InputError:
            unknown.append(b)
            continue
        here = [e for e in ents if _same_object(e.obj, orig)]
        if ents and not here:
            notes.append(f"{b}: predictions found only for other objects ({ents[0].obj}, ...)")
        preds[b] = here

    def covers(b: str) -> dict[str, Entry]:
        """Changed-or-not function names the prediction of ``b`` says must be replaced, with their entries."""
        out: dict[str, Entry] = {}
        for e in preds.get(b, []):
            if e.status == "replace":
                out.setdefault(e.name, e)
                for p in e.pieces:
                    out.setdefault(p, e)
        return out

    cov = {b: covers(b) for b in preds}
    # identical code folding: separate functions sharing one address (never pieces of one another)
    folded_of = {e.name: e.folded for ents in preds.values() for e in ents if e.folded}
    by_base: dict[str, list[str]] = {}
    for c in changed:
        by_base.setdefault(base_function(c), []).append(c)
    # a base is explained when another base's prediction covers one of its changed functions
    explained = {b for b in bases if any(o != b and any(c in cov.get(o, {}) for c in by_base[b]) for o in bases)}
    callers = _callers(orig, changed)
    unpredicted: list[dict[str, str]] = []
    seeds: list[str] = []
    for b in bases:
        if b in explained:
            continue
        calls = sorted({f for c in by_base[b] for f in callers.get(c, set()) if base_function(f) != b})
        if calls:  # changed although no dump record links it: it calls a changed function
            for c in by_base[b]:
                unpredicted.append({"name": c, "cause": _cause(c, unknown, calls, folded_of)})
        else:
            seeds.append(b)
    covered = {c for s in seeds for c in cov.get(s, {})} | {c for s in seeds for c in by_base.get(s, [])}
    covered |= {u["name"] for u in unpredicted}
    for b in bases:  # bases that only explain each other (a cycle): take them as seeds too
        if b not in seeds and not all(c in covered for c in by_base[b]):
            seeds.append(b)
            covered |= set(cov.get(b, {})) | set(by_base[b])
    inferred = _inferred_sources(idx, orig, seeds, by_base, set(changed))

    rows: list[dict[str, Any]] = []
    odd = {u["name"]: u["cause"] for u in unpredicted}
    for c in changed:
        if c in odd:
            rows.append({"name": c, "predicted": False, "cause": odd[c]})
            continue
        hit = next(((s, cov[s][c]) for s in seeds if c in cov.get(s, {})), None)
        if hit is None or (hit[0] == base_function(c) and not hit[1].chain and c == hit[1].name):
            src = [i for i in inferred if c in i["explains"]]
            row: dict[str, Any] = {"name": c, "predicted": True, "seed": base_function(c), "chain": [],
                                   "transforms": [], "how": "a seed: taken as changed in the source"}
            if src:
                row["inferred_from"] = [i["name"] for i in src]
                row["how"] += (f"; or the edit was in {' / '.join(i['name'] for i in src)}, whose code "
                               f"lives here: {src[0]['chains'].get(c, '')}")
            rows.append(row)
            continue
        seed, e = hit
        how = (f"part of {e.name} ({_piece_kind(c, e.name)})" if c != e.name else
               "; ".join(st.text() for st in e.chain) or "the seed itself")
        rows.append({"name": c, "predicted": True, "seed": seed, "chain": [st.text() for st in e.chain],
                     "transforms": e.transforms, "avoided_by": e.avoided_by, "how": how})

    patched = _patched_names(str(res.report.get("patched", "")))
    changed_set = set(changed)
    pu: list[dict[str, Any]] = []
    for s in seeds:
        for name, e in sorted(cov.get(s, {}).items()):
            if name in changed_set:
                continue
            pu.append({"name": name, "seed": s, "chain": [st.text() for st in e.chain],
                       "reason": _why_unchanged(name, e, patched)})
    predicted = sorted({n for s in seeds for n in cov.get(s, {})} | {c for s in seeds for c in by_base.get(s, [])})
    for b in unknown:
        notes.append(f"{b}: not in any ipa-clones dump or symbol table ({len(idx.dumps)} dumps)")
    return {"dumps": str(dumps), "object": str(orig), "seeds": seeds, "inferred_sources": inferred,
            "changed": rows, "unpredicted": unpredicted, "predicted_unchanged": pu, "predicted": predicted,
            "notes": notes}


def _inferred_sources(idx: Any, orig: Path, seeds: list[str], by_base: dict[str, list[str]],
                      changed: set[str]) -> list[dict[str, Any]]:
    """Functions of the diffed object with no symbol of their own (inlined everywhere) whose code lives
    in seeds, and whose whole prediction was found changed: likely where the source edit really was
    (``helper`` for changed ``caller_a`` and ``caller_b``)."""
    import numpy as np

    from ..ipa.closure import impact

    groups = [g for g, o in enumerate(idx.objects) if o and _same_object(o, orig)]
    if not groups or not seeds:
        return []
    seed_ids = [i for i in (idx.name_id(s) for s in seeds) if i >= 0]
    in_group = np.isin(idx.n_group, groups)
    cur = np.flatnonzero(in_group & np.isin(idx.f_name[idx.n_func], seed_ids))
    seen = np.zeros(len(idx.n_group), np.bool_)
    seen[cur] = True
    while len(cur):  # walk the edges backwards: who was inlined or cloned into the seeds
        src = idx.e_src[np.isin(idx.e_dst, cur)]
        cur = np.unique(src[~seen[src]])
        seen[cur] = True
    seed_fns = {c for s in seeds for c in by_base.get(s, [])}
    out = []
    for name in sorted({idx.names[int(idx.f_name[idx.n_func[n]])] for n in np.flatnonzero(seen)}):
        if name in seeds:
            continue
        try:
            ents = [e for e in impact(idx, [name], with_callers=False).entries if _same_object(e.obj, orig)]
        except InputError:
            continue
        if any(e.name == name and e.status == "replace" for e in ents):
            continue  # it has code of its own: a change there would show in it
        repl = {e.name: e for e in ents if e.status == "replace"}
        explains = sorted(set(repl) & seed_fns)
        if repl and set(repl) <= changed and explains:
            out.append({"name": name, "explains": explains,
                        "chains": {n: "; ".join(st.text() for st in repl[n].chain) for n in explains}})
    out.sort(key=lambda i: (-len(i["explains"]), i["name"]))
    return out


def _piece_kind(piece: str, owner: str) -> str:
    if clone_parent(piece) == owner:
        return "its cold part"
    if piece == owner + ".localalias":
        return "its local alias"
    return "an identical-code-folded alias"


def _callers(orig: Path, changed: list[str]) -> dict[str, set[str]]:
    """Changed function -> the changed functions in ``orig`` whose code refers to it (from relocations)."""
    from ..ipa.objsyms import reloc_callers

    try:
        found = reloc_callers(orig, set(changed))
    except InputError:
        return {}
    out: dict[str, set[str]] = {}
    for callee, users in found.items():
        for u in users:
            out.setdefault(u, set()).add(callee)
    return out


def _cause(name: str, unknown: list[str], calls: list[str], folded_of: dict[str, list[str]] | None = None) -> str:
    base = base_function(name)
    folds = [(c, folded_of[c]) for c in calls if folded_of and folded_of.get(c)]
    if folds:
        c, others = folds[0]
        return (f"calls {c}, which GCC's identical code folding had made one body with {', '.join(others)} in the "
                f"original: once the edit made them differ, its call names its own callee's body, so its code "
                "changed with it (the diff keeps the other function's old body for its callers)")
    if calls:
        return (f"calls changed {', '.join(calls)}: compiled with assumptions about the callee's body (IPA-RA, "
                "pure-const, modref, ipa-vrp/bit-cp), which -fdump-ipa-clones does not record - unless it was "
                "edited too")
    if base in unknown:
        return "not in any dump: a function GCC made without a clone record, or a build without the dumps"
    if name.startswith("CSWTCH") or ".cold" in name:
        return "GCC-made symbol with no dump record (switch table or cold part)"
    return "no recorded inlining or cloning links it to another changed function"


def _why_unchanged(name: str, e: Any, patched: set[str] | None) -> str:
    if patched is not None and name not in patched:
        return "not in the patched object: the clone was renumbered or no longer made (check its new name)"
    kinds = [s.kind for s in e.chain]
    last = kinds[-1] if kinds else ""
    if last in ("inline", "inline-global"):
        return "the inlined copy compiled to identical code (the edit did not reach this caller's code)"
    if last == "caller-of-clone":
        return "calls the changed clone, but its own code did not change"
    if last in ("constprop", "isra", "part", "other", "recursion"):
        return "the clone compiled to identical code"
    if name != e.name:
        return "a piece (cold part or alias) of the function whose code did not change"
    return "its own code did not change: the edit only reached the code of its clones, split parts or callers"


def summary_lines(imp: dict[str, Any]) -> list[str]:
    """A few lines for the human summary of ``klpforge diff --impact``.

    >>> summary_lines({"changed": [{"name": "f", "predicted": True}], "seeds": ["f"], "unpredicted": [],
    ...                "predicted_unchanged": [], "inferred_sources": []})[0]
    'impact (ipa-clones): 1/1 changed functions predicted; seeds: f'
    """
    rows = imp["changed"]
    ok = sum(1 for r in rows if r["predicted"])
    out = [f"impact (ipa-clones): {ok}/{len(rows)} changed functions predicted; seeds: "
           f"{', '.join(imp['seeds']) or '-'}"]
    for r in rows:
        if r["predicted"] and r.get("chain"):
            out.append(f"  {r['name']}: {r['how']}")
    for src in imp.get("inferred_sources", [])[:3]:
        out.append(f"  the edit may be in {src['name']} (no code of its own; inlined into "
                   f"{', '.join(src['explains'])})")
    for u in imp["unpredicted"]:
        out.append(f"  not predicted: {u['name']}: {u['cause']}")
    for p in imp["predicted_unchanged"]:
        out.append(f"  predicted, unchanged: {p['name']}: {p['reason']}")
    return out
