"""Why a function's code differs between the build as it was made and the build with the flag.

Each reason is backed by evidence from the two builds: their ``-fdump-ipa-clones`` records (gcc 12
``cgraph.cc``/``cgraphclones.cc`` format, see ``docs/impact.md``) and the functions' code and relocations.

============  =====================================================================================
kind          evidence
============  =====================================================================================
inline        a ``Callgraph clone;X;...;F;...;inlining to`` record in one build only
clone         F calls ``g.constprop.N``/``.isra``/``.part`` in one build and another version of ``g``
              in the other (IPA-CP, IPA-SRA, ipa-split)
icf           F is an alias of, or a lone jump to, identical code (``-fipa-icf``), or F calls one
              function where the other build calls its folded twin
pure-const    fewer calls to a function of the unit in the build (found const/pure: result reused, call
              dropped), or a call to a function whose code never returns (noreturn discovery)
ipa-ra        a caller-saved register read after a call to a function of the unit before being written:
              IPA-RA knew the callee leaves it alone (gcc turns IPA-RA off under ``-pg`` and
              ``-fpatchable-function-entry``, ``toplev.cc``)
callee-ipa    none of the above, but F calls functions of its unit: what IPA learned about their bodies
              (modref, ipa-reference, ipa-vrp/bit-cp) is no longer used
unexplained   no evidence found (instruction order or register choice differs: summaries such as
              modref leave no trace in the objects)
============  =====================================================================================

>>> Reason("inline", "`g` inlined in the build, called with the flag").kind
'inline'
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.model import Object
from ..diff.names import base_function, canonical, is_cold
from .calls import Func, call_segments, can_return, live_across_calls

__all__ = ["Reason", "REASON_KINDS", "Dump", "read_dump", "explain", "Context"]

REASON_KINDS = ("inline", "clone", "icf", "pure-const", "ipa-ra", "stack-align", "callee-ipa", "unexplained")
_CLONE = re.compile(r"\.(constprop|isra|part)\.\d+")


@dataclass(frozen=True)
class Reason:
    """One cause of a change: ``kind`` (one of :data:`REASON_KINDS`), a sentence with the evidence, and
    ``rank``: how directly the evidence shows the code change (lower first; the first reason of a function
    is the one totals count)."""

    kind: str
    detail: str
    rank: int = 0


@dataclass
class Dump:
    """One ``.ipa-clones`` dump: ``inlined[F]`` = functions inlined into offline function F;
    ``clones`` = (original, clone name, kind) for constprop/isra/part records."""

    inlined: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    clones: list[tuple[str, str, str]] = field(default_factory=list)
    inlined_any: set[str] = field(default_factory=set)
    _all: dict[str, frozenset[str]] = field(default_factory=dict)

    def inlined_all(self, f: str) -> frozenset[str]:
        """Every function whose body ended up in ``f``: the dump records one level at a time (``x`` into
        ``y``, then ``y`` into ``f``), so this is their closure."""
        got = self._all.get(f)
        if got is None:
            seen: set[str] = set()
            todo = list(self.inlined.get(f, ()))
            while todo:
                x = todo.pop()
                if x not in seen and x != f:
                    seen.add(x)
                    todo.extend(self.inlined.get(x, ()))
            got = self._all[f] = frozenset(seen)
        return got


def read_dump(path: Path | None) -> Dump:
    """Parse a gcc 12 ``-fdump-ipa-clones`` file (12-field clone records; removals are ignored here)."""
    d = Dump()
    if path is None or not path.is_file():
        return d
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("Callgraph clone;"):
            continue
        f = line.split(";")
        if len(f) < 12:
            continue
        kind = f[-1]
        if kind == "inlining to":
            d.inlined[f[6]].add(f[1])
            d.inlined_any.add(f[1])
        elif kind in ("constprop", "isra", "part"):
            d.clones.append((f[1], f[6], kind))
    return d


@dataclass
class Context:
    """Both builds of one object: objects, function facts, dumps, and whether IPA-RA ran in the build."""

    a: Object
    b: Object
    fa: dict[str, Func]
    fb: dict[str, Func]
    da: Dump
    db: Dump
    ipa_ra: bool
    flag: str = "-flive-patching=inline-clone"
    _returns: dict[str, bool] = field(default_factory=dict)

    def returns(self, name: str) -> bool:
        """Can function ``name`` (of the flag build, else the build) return?"""
        r = self._returns.get(name)
        if r is None:
            obj, f = (self.b, self.fb[name]) if name in self.fb else (self.a, self.fa[name])
            r = self._returns[name] = can_return(obj, f)
        return r


def _r(kind: str, rank: int, detail: str) -> Reason:
    return Reason(kind, detail, rank)


def _by_canon(refs: dict[str, int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for n in refs:
        out[canonical(n)].append(n)
    return out


def _aliases(facts: dict[str, Func]) -> dict[str, set[str]]:
    """Function -> the functions sharing its code (ICF aliases and their owner)."""
    groups: dict[str, set[str]] = defaultdict(set)
    for f in facts.values():
        if f.alias_of:
            groups[f.alias_of] |= {f.alias_of, f.name}
    out: dict[str, set[str]] = {}
    for g in groups.values():
        for n in g:
            out[n] = g
    return out


def explain(ctx: Context, fa: Func | None, fb: Func | None) -> list[Reason]:
    """Reasons why function ``fa`` (build) and ``fb`` (flag build) differ; one of them may be None
    (a function only one build has). Never empty: ``unexplained`` when nothing is found."""
    out: list[Reason] = []
    if fa is None and fb is not None:
        twin = _folded_twin(ctx, fb.name)
        if twin:
            return [_r("icf", 0, f"only with the flag: the build folded it into the identical `{twin}`")]
        base = fb.name.split(".", 1)[0]
        clones = sorted(n for n in ctx.fa if _CLONE.search(n) and n.split(".", 1)[0] == base)
        if clones:
            out.append(_r("clone", 1, f"only with the flag: the build replaced it by {', '.join(clones)}"))
        elif any(fb.name in v for v in ctx.da.inlined.values()) or fb.name in _inlined_everywhere(ctx.da):
            out.append(_r("inline", 3, "only with the flag: the build inlined it into every caller"))
        return out or [_r("unexplained", 9, "only with the flag")]
    if fb is None and fa is not None:
        if _CLONE.search(fa.name):
            kind = _CLONE.search(fa.name).group(1)  # type: ignore[union-attr]
            out.append(_r("clone", 1, f"a {kind} clone only the build made"))
        elif fa.alias_of or fa.thunk_to:
            out.append(_r("icf", 0, f"folded into `{fa.alias_of or fa.thunk_to}` in the build"))
        return out or [_r("unexplained", 9, "only in the build")]
    assert fa is not None and fb is not None
    # icf: the function itself
    if fa.alias_of and not fb.alias_of:
        out.append(_r("icf", 0, f"shares the code of `{fa.alias_of}` in the build (identical code folded); "
                                 "its own copy with the flag"))
    if fa.thunk_to and not fb.thunk_to and base_function(fa.thunk_to) not in {base_function(r) for r in fb.refs}:
        # a plain tail call to the same function in both builds is no folding
        out.append(_r("icf", 0, f"a jump to the identical `{fa.thunk_to}` in the build; its own "
                                                  "body with the flag"))
    # inlining decisions: every body that ended up in F (records chain: x into y, y into F)
    ia, ib = ctx.da.inlined_all(fa.name), ctx.db.inlined_all(fb.name)
    for x in sorted(ia - ib):
        out.append(_r("inline", 2, f"`{x}` inlined in the build, "
                                    + ("called with the flag" if any(canonical(r) == canonical(x) or
                                                                     r.split('.', 1)[0] == x for r in fb.refs)
                                       else "not inlined with the flag")))
    for x in sorted(ib - ia):
        if x not in ctx.da.inlined_any and x not in ctx.fa:
            # no call of it survived to be inlined anywhere in the build: ipa-pure-const found it const or
            # pure and its calls were deleted as dead first (the flag turns the pass off)
            out.append(_r("pure-const", 5, f"`{x}`: its calls were deleted in the build (found const/pure; "
                                            "it is inlined nowhere in the unit), inlined with the flag"))
        else:
            out.append(_r("inline", 3, f"`{x}` inlined only with the flag"))
    # references: clones and folded twins
    ca, cb = _by_canon(fa.refs), _by_canon(fb.refs)
    al = _aliases(ctx.fa)
    for key in sorted(set(ca) - set(cb)):
        for t in ca[key]:
            if _CLONE.search(t) and not any(_folded_twin(ctx, u) == t for u in fb.refs):
                base = t.split(".", 1)[0]
                other = sorted(n for n in fb.refs if n.split(".", 1)[0] == base)
                out.append(_r("clone", 1, f"calls the clone `{t}` in the build"
                                           + (f", `{other[0]}` with the flag" if other else "")))
    for key in sorted(set(cb) - set(ca)):
        for t in cb[key]:
            twin = _folded_twin(ctx, t)
            if twin and twin in fa.refs:
                out.append(_r("icf", 0, f"calls `{twin}` for `{t}` in the build: identical code folded"))
            elif _CLONE.search(t):
                out.append(_r("clone", 1, f"calls the clone `{t}` only with the flag"))
            elif t in al or any(t in al.get(x, ()) for x in fa.refs):
                twin = next((x for x in fa.refs if t in al.get(x, ())), None)
                if twin:
                    out.append(_r("icf", 1, f"calls `{twin}` for `{t}` in the build: identical code folded"))
    # the unit's functions it calls: call counts, noreturn, live registers
    # calls into code GCC compiled in this unit (not asm, not F's own .cold part): what IPA summarises
    local = {n for n in fb.refs if n in ctx.fb and ctx.fb[n].compiled and not is_cold(n)
             and base_function(n) != base_function(fb.name)}
    for n in sorted(local):
        # folded twins share their calls in the build; clones of one function (g, g.constprop.0) count as g
        group = al.get(n, {n}) | {x for x in fa.refs if base_function(x) == base_function(n)}
        twin = _folded_twin(ctx, n)
        if twin:  # the build calls its folded twin instead
            group |= {twin}
        c_a = sum(fa.refs.get(x, 0) for x in group)
        c_b = sum(fb.refs.get(x, 0) for x in group | {x for x in fb.refs if base_function(x) == base_function(n)})
        if c_a < c_b and not _inlined_in(ctx.da, fa.name, n):
            out.append(_r("pure-const", 1, f"{c_b} reference(s) to `{n}` with the flag, {c_a} in the build: "
                                            "found const/pure, its result reused or the call dropped"))
        elif not ctx.returns(n):
            out.append(_r("pure-const", 1, f"`{n}` never returns: the build knew it (noreturn discovery) and "
                                            "dropped the code after its call"))
    if ctx.ipa_ra:
        live = live_across_calls(ctx.a, fa, {n for n in fa.refs if n in ctx.fa})
        for n, regs in sorted(live.items()):
            out.append(_r("ipa-ra", 1, f"keeps {', '.join('%' + r for r in regs)} live across its call to `{n}` "
                                        "in the build (IPA-RA knew the callee leaves them alone)"))
    if fb.stack_pads > fa.stack_pads and not out:  # a new call (an inlining forbidden) pads the stack too
        out.append(_r("stack-align", 1, f"{fb.stack_pads - fa.stack_pads} stack realignment(s) (`sub $8,%rsp`) "
                                         "only with the flag: the build knew its callees need no 16-byte aligned "
                                         "stack (-fipa-stack-alignment)"))
    if local and not any(r.rank <= 2 for r in out):
        out.append(_callee_ipa(ctx, fa, fb, local))
    # one line per distinct reason
    seen: set[Reason] = set()
    uniq = [r for r in out if not (r in seen or seen.add(r))]  # type: ignore[func-returns-value]
    uniq.sort(key=lambda r: r.rank)  # stable: same-rank evidence keeps its order
    return uniq or [_r("unexplained", 9, "no inlining, clone, folding or call difference found")]


def _folded_twin(ctx: Context, t: str) -> str | None:
    """The function the build calls in place of ``t``, a function only the flag build has: identical code
    folding (``-fipa-icf``, off under the flag) kept one of two equal bodies. Found through ``t``'s callers:
    one the build calls instead, of the same size in the flag build."""
    ft = ctx.fb.get(t)
    if ft is None or t in ctx.fa:
        return None
    for c, fc in ctx.fb.items():
        if t not in fc.refs or c not in ctx.fa:
            continue
        for x in sorted(set(ctx.fa[c].refs) - set(fc.refs)):
            fx = ctx.fb.get(x)
            if fx is not None and fx.size == ft.size and x != t:
                return x
    return None


def _callee_ipa(ctx: Context, fa: Func, fb: Func, local: set[str]) -> Reason:
    """The callee-ipa reason, naming the calls after which the code differs when both builds make the
    same calls in the same order (see :func:`~.calls.call_segments`), else the unit's callees."""
    sa, sb = call_segments(ctx.a, fa), call_segments(ctx.b, fb)
    if sa is not None and sb is not None:
        # call sites paired by aligning the two call sequences (a call may exist in one build only)
        sm = difflib.SequenceMatcher(None, [canonical(t) for t, _ in sa], [canonical(t) for t, _ in sb],
                                     autojunk=False)
        grew: dict[str, list[int]] = defaultdict(list)
        for i, j, n in sm.get_matching_blocks():
            for (_t, ma), (tb, mb) in zip(sa[i:i + n], sb[j:j + n], strict=True):
                if ma != mb and tb in local:
                    grew[tb].append(len(mb) - len(ma))
        if grew:
            parts = [f"`{n}` ({len(d)} of {sum(1 for t, _ in sb if t == n)} call sites, "
                     f"{sum(d):+d} instructions)" for n, d in sorted(grew.items(), key=lambda kv: -abs(sum(kv[1])))]
            return _r("callee-ipa", 4, "the code right after its calls to " + ", ".join(parts[:3])
                      + (" ..." if len(parts) > 3 else "") + " differs: the build used what IPA learned about "
                      "those callees (modref, ipa-reference: memory they leave alone is not reloaded, a local "
                      "they do not let escape is not stored)")
    return _r("callee-ipa", 4, "calls " + ", ".join(f"`{n}`" for n in sorted(local)[:3])
              + (" ..." if len(local) > 3 else "")
              + " of its unit: the build used what IPA learned about their bodies (modref, "
                "ipa-reference: memory they leave alone need not be reloaded after the call)")


def _inlined_in(d: Dump, into: str, name: str) -> bool:
    return name in d.inlined.get(into, set())


def _inlined_everywhere(d: Dump) -> set[str]:
    out: set[str] = set()
    for v in d.inlined.values():
        out |= v
    return out
