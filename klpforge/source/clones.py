"""GCC clones in the source-based way: when the binary diff replaces ``foo.isra.0`` (``.constprop.N``,
``.part.N``), the live patch written in C replaces the clone's *callers* instead (what SUSE's kgraft/klp-ccp
process does with ``kgraft-ipa-analysis.py``).

Why: a clone has its own calling convention (IPA-SRA removed or split parameters, IPA-CP folded constant
ones in, ipa-split moved the tail of the function out). The C file cannot define a function with that
convention; it defines ``foo`` (copied, ``static``) and GCC makes whatever clone it likes of it inside the
module. So the functions that call the old clone in the running kernel must be replaced by the module's
versions, which call the module's ``foo``. The running kernel's clone is then unreachable: a clone is local
to its object (GCC 12 never clones a function whose address escapes without keeping the original), and
every call to it is a relocation in that object's code.

The callers come from klpforge's impact analysis (:func:`klpforge.ipa.predict`) on the original object's
``-fdump-ipa-clones`` dump (the binary diff compiles it with the flag, which changes no code: GCC 12
``cgraphclones.cc``), whose ``caller-of-clone`` steps are read from the object's relocations; the clone the
binary diff replaces must be among the clones that analysis predicts for the changed source function (else
the relocations alone are used, and the plan says so). A caller that is itself a clone is handled the same
way, up to a fixpoint.

>>> plan = clone_plan(Path("orig/fs/proc/base.o"), "fs/proc/base.c", ["__set_oom_adj.isra.0"])  # doctest: +SKIP
>>> plan.callers                                                                              # doctest: +SKIP
{'oom_adj_write': 'calls __set_oom_adj.isra.0 ...', 'oom_score_adj_write': '...'}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.names import canonical
from ..util.errors import InputError, UnsafeChange

__all__ = ["ClonePlan", "clone_plan", "clone_base", "is_abi_clone", "dump_of", "inlined_into"]

#: the suffixes of a GCC clone with its own calling convention (``.cold``/``.localalias`` are pieces or
#: aliases of one function, not clones): GCC 12 ``cgraphclones.cc`` clone names
_ABI = re.compile(r"\.(isra|constprop|part)(\.\d+)?")
_KIND = {"isra": "IPA-SRA", "constprop": "IPA-CP", "part": "ipa-split (partial inlining)"}


def is_abi_clone(name: str) -> bool:
    """``foo.isra.0``, ``foo.constprop.0.isra.0``, ``foo.part.0`` (and their ``.cold`` parts): True."""
    return bool(_ABI.search(name))


def clone_base(name: str) -> str:
    """The C function a clone was made of: ``foo.constprop.0.isra.0`` -> ``foo``."""
    return _ABI.split(name, 1)[0]


def dump_of(obj: Path) -> Path:
    """Where GCC wrote the ``-fdump-ipa-clones`` dump of ``obj`` (``x/base.o`` -> ``x/base.c.000i.ipa-clones``:
    the output's directory and base name plus the source suffix, GCC 12 ``dumpfile.cc``)."""
    return obj.with_name(obj.name.removesuffix(".o") + ".c.000i.ipa-clones")


@dataclass
class ClonePlan:
    """What the C source does about the clones: ``callers`` (name -> why) are replaced, ``copies``
    (C function -> why) are copied as the module's own; ``clones`` maps each clone to its callers."""

    callers: dict[str, str] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    clones: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _kind(clone: str) -> str:
    m = _ABI.findall(clone)
    return " then ".join(_KIND[k] for k, _n in m) if m else "compiler"


def clone_plan(orig: Path, rel: str, clones: list[str], replaced: set[str] | None = None,
               strip: tuple[str, ...] = ()) -> ClonePlan:
    """The callers to replace for ``clones`` (names in the original object ``orig``, compiled from ``rel``).

    ``replaced``: functions the binary diff replaces anyway (kept out of ``callers``); ``strip``: path
    prefixes removed from the reasons (the binary diff's temporary directories). Raises UnsafeChange
    when a clone is referenced by no function (its address is data: it cannot be redirected from C)."""
    from ..ipa import predict
    from ..ipa.objsyms import reloc_callers

    plan = ClonePlan()
    replaced = replaced or set()
    predicted: dict[str, dict[str, str]] = {}  # clone -> caller -> the impact chain
    bases = sorted({clone_base(c) for c in clones})
    dump = dump_of(orig)
    if dump.is_file():
        try:
            res = predict([dump], [f"{rel}:{b}" for b in bases], use_cache=False)
        except InputError as err:  # a base the dump does not name: the relocations alone
            plan.notes.append(f"impact analysis: {err}")
        else:
            for ent in res.entries:
                steps = list(ent.chain)
                if ent.status == "replace" and steps and steps[-1].kind == "caller-of-clone":
                    text = "; ".join(s.text() for s in steps)
                    for p in strip:
                        text = text.replace(p, "")
                    predicted.setdefault(steps[-1].src, {})[ent.name] = text
    else:
        plan.notes.append(f"no -fdump-ipa-clones dump {dump.name}: callers from the relocations only")
    todo = list(clones)
    done: set[str] = set()
    while todo:
        c = todo.pop(0)
        if c in done:
            continue
        done.add(c)
        base = clone_base(c)
        if c in predicted:
            callers = predicted[c]
        else:
            if dump.is_file() and c in clones:
                plan.notes.append(f"{c}: not among the clones the impact analysis predicts for {base}: "
                                  "callers from the relocations")
            found = reloc_callers(orig, {c}).get(c, set())
            callers = {n: f"`{c}` is called by `{n}` (a relocation in {rel.removesuffix('.c')}.o)" for n in found}
        callers = {n: w for n, w in callers.items() if canonical(n) != canonical(c) + ".cold"
                   and not n.startswith(c + ".cold")}
        if not callers:
            raise UnsafeChange(f"{rel}: {c} (a {_kind(c)} clone of {base}) is called by no function of "
                               f"{orig.name}: its callers cannot be replaced from source")
        plan.clones[c] = sorted(callers)
        plan.copies.setdefault(base, f"the running kernel has {base} only as the {_kind(c)} clone {c} "
                                     "(another calling convention): copied, and the clone's callers replaced")
        for n, chain in sorted(callers.items()):
            if is_abi_clone(n):  # a clone calls it: that clone's own callers, in turn
                todo.append(n)
                continue
            if n in replaced or n in plan.callers:
                continue
            plan.callers[n] = (f"calls {c}, the {_kind(c)} clone of {base} (its own calling convention): "
                               f"replaced so that it calls the new {base} ({chain})")
    return plan


def inlined_into(dump: Path, outer: set[str]) -> dict[str, str]:
    """Functions GCC inlined into any of ``outer`` (assembler names: ``dup_mmap``, ``foo.isra.0``), from
    the ``-fdump-ipa-clones`` dump: C function name -> the first such outer function. An ``inlining to``
    record names the outermost offline function the body ended up in, so nested inlining is covered
    (``/work/shared/docs/ipa-clones.md`` section 2). Empty when there is no dump."""
    out: dict[str, str] = {}
    if not dump.is_file():
        return out
    for line in dump.read_text(errors="replace").splitlines():
        f = line.split(";")
        if len(f) == 12 and f[0] == "Callgraph clone" and f[11] == "inlining to" and f[6] in outer:
            out.setdefault(clone_base(f[1]), f[6])
    return out
