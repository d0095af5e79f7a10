"""Per object: correlate and compare its two builds with the diff engine, explain every change, and size
the live patches (impact sets) both builds imply.

>>> cost = measure_object("kernel/sched/core.o", pair)      # doctest: +SKIP
>>> cost.changed, cost.total                                # doctest: +SKIP
(212, 1317)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.arch import arch_for
from ..diff.compare import CHANGED, compare
from ..diff.correlate import correlate
from ..diff.model import Object
from ..diff.names import base_function, clone_parent, is_cold
from ..elf import constants as C
from ..util.errors import InputError, KlpError
from .calls import Func, function_facts
from .reasons import REASON_KINDS, Context, Reason, explain, read_dump

__all__ = ["FunctionCost", "ObjectCost", "BuildPair", "measure_object", "text_size", "clone_count"]


@dataclass(frozen=True)
class BuildPair:
    """The two builds of one object: objects and their ipa-clones dumps; ``ipa_ra``: did IPA-RA run in
    the build (no ``-pg``/``-fpatchable-function-entry``/``-fno-ipa-ra`` in its command)."""

    built: Path
    flag: Path
    built_dump: Path | None
    flag_dump: Path | None
    ipa_ra: bool
    flag_text: str = "-flive-patching=inline-clone"


@dataclass
class FunctionCost:
    """One function: ``status`` ``same``/``changed``/``built-only``/``flag-only``; sizes in bytes (own code:
    0 for a folded alias); impact set sizes (functions a patch to it must replace): from the build's
    dumps, plus the callers compiled with what IPA learned about its body, and with the flag."""

    name: str
    obj: str
    status: str
    size_built: int
    size_flag: int
    reasons: list[Reason] = field(default_factory=list)
    impact_built: int = 0
    impact_built_callers: int = 0
    impact_flag: int = 0
    built_name: str = ""  # the name in the build when it differs (a renumbered clone)

    @property
    def growth(self) -> int:
        """Bytes of code the flag adds to this function (negative: removes)."""
        return self.size_flag - self.size_built


@dataclass
class ObjectCost:
    """Totals for one object; ``text_*`` is the size of its executable sections in bytes."""

    obj: str
    functions: list[FunctionCost]
    text_built: int
    text_flag: int
    clones_built: int
    clones_flag: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(1 for f in self.functions if not is_cold(f.name))

    @property
    def changed(self) -> int:
        return sum(1 for f in self.functions if f.status != "same" and not is_cold(f.name))

    @property
    def clones_avoided(self) -> int:
        return self.clones_built - self.clones_flag

    def reason_counts(self) -> dict[str, int]:
        """Changed functions (``.cold`` parts left out) per primary reason: the first, most direct one."""
        out = dict.fromkeys(REASON_KINDS, 0)
        for f in self.functions:
            if f.reasons and not is_cold(f.name):
                out[f.reasons[0].kind] += 1
        return out


def text_size(obj: Object) -> int:
    """Bytes in allocated executable sections."""
    n = 0
    for s in range(1, obj.nsec):
        fl = obj.section_flags(s)
        if fl & C.SHF_ALLOC and fl & C.SHF_EXECINSTR:
            n += int(obj.shdrs["size"][s])
    return n


def clone_count(facts: dict[str, Func]) -> int:
    """IPA clones (``.constprop``/``.isra``/``.part`` symbols, their ``.cold`` parts left out)."""
    return sum(1 for n in facts if any(f".{k}." in n + "." for k in ("constprop", "isra", "part"))
               and not is_cold(n))


def measure_object(obj_name: str, pair: BuildPair, with_impact: bool = True) -> ObjectCost:
    """Compare the two builds of ``obj_name`` function by function (see the module docstring)."""
    a, b = Object.load(pair.built), Object.load(pair.flag)
    arch = arch_for(a.elf.machine)
    corr = correlate(a, b)
    cmp = compare(corr, arch)
    fa, fb = function_facts(a), function_facts(b)
    ctx = Context(a, b, fa, fb, read_dump(pair.built_dump), read_dump(pair.flag_dump), pair.ipa_ra,
                  pair.flag_text)
    out: list[FunctionCost] = []
    paired_a: set[str] = set()
    for name, f in fb.items():
        oi = int(corr.p2o[f.index])
        ga = fa.get(a.sym_names[oi]) if oi >= 0 else None
        if ga is None:
            out.append(FunctionCost(name, obj_name, "flag-only", 0, f.own_size, explain(ctx, None, f)))
            continue
        paired_a.add(ga.name)
        changed = cmp.status.get(f.index) == CHANGED or ga.own_size != f.own_size \
            or bool(ga.alias_of) != bool(f.alias_of) or bool(ga.thunk_to) != bool(f.thunk_to)
        fc = FunctionCost(name, obj_name, "changed" if changed else "same", ga.own_size, f.own_size,
                          built_name=ga.name if ga.name != name else "")
        if changed:
            fc.reasons = explain(ctx, ga, f)
        out.append(fc)
    for name, g in fa.items():
        if name not in paired_a:
            out.append(FunctionCost(name, obj_name, "built-only", g.own_size, 0, explain(ctx, g, None)))
    # a .cold part is the unlikely half of its parent: it changes with it, for the parent's reasons
    by_name = {fc.name: fc for fc in out}
    for fc in out:
        parent = by_name.get(clone_parent(fc.name) or "")
        if is_cold(fc.name) and fc.status != "same" and parent is not None and parent.reasons:
            fc.reasons = [Reason(r.kind, f"(cold part of `{parent.name}`) {r.detail}", r.rank)
                          for r in parent.reasons]
    cost = ObjectCost(obj_name, out, text_size(a), text_size(b), clone_count(fa), clone_count(fb))
    if with_impact:
        _impact_sizes(cost, pair, (a, fa), (b, fb))
    return cost


def _callers(facts: dict[str, Func]) -> dict[str, set[str]]:
    rev: dict[str, set[str]] = defaultdict(set)
    for f in facts.values():
        for t in f.refs:
            if t in facts:
                rev[t].add(f.name)
    return rev


_TYPES = {C.STT_NOTYPE: "NOTYPE", C.STT_FUNC: "FUNC", C.STT_OBJECT: "OBJECT", C.STT_SECTION: "SECTION",
          C.STT_FILE: "FILE"}
_BINDS = {C.STB_LOCAL: "LOCAL", C.STB_GLOBAL: "GLOBAL", C.STB_WEAK: "WEAK"}


def _write_syms(obj: Object, dump: Path) -> None:
    """``X.o.syms`` beside ``X.c.000i.ipa-clones`` (the symbol table layout ``klpforge.ipa`` reads first),
    from the already-read object: reading it again with pyelftools costs seconds on a large ``-g`` object."""
    from ..ipa.objsyms import Sym, syms_text

    rows = []
    for i in range(1, obj.nsym):
        name = obj.sym_names[i]
        if not obj.defined[i] or not name:
            continue
        sec = int(obj.shndx[i])
        rows.append(Sym(name, _TYPES.get(int(obj.stype[i]), "OTHER"), _BINDS.get(int(obj.sbind[i]), "OTHER"),
                        obj.sec_names[sec] if 0 < sec < obj.nsec else "ABS", int(obj.size[i]), int(obj.value[i]),
                        sec if 0 < sec < obj.nsec else -1))
    stem = dump.name.split(".c.", 1)[0] if ".c." in dump.name else dump.name.split(".", 1)[0]
    (dump.parent / f"{stem}.o.syms").write_bytes(syms_text(rows))


def _impact_sizes(cost: ObjectCost, pair: BuildPair, built: tuple[Object, dict[str, Func]],
                  flag: tuple[Object, dict[str, Func]]) -> None:
    """Fill the impact set sizes of every function with klpforge's ipa closure (``klpforge.ipa.impact``)
    over each build's dump, plus the callers of the clones it reaches (one level, as ``klpforge impact``)."""
    from ..ipa import impact, load_index

    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    for tag, dump, (obj, facts) in (("built", pair.built_dump, built), ("flag", pair.flag_dump, flag)):
        res: dict[str, tuple[int, int]] = {}
        sizes[tag] = res
        if dump is None or not dump.is_file():
            cost.notes.append(f"{cost.obj}: no ipa-clones dump for the {tag} build: impact sizes left at 0")
            continue
        try:
            _write_syms(obj, dump)
            idx = load_index([dump], None, None, use_cache=False)
        except KlpError as e:
            cost.notes.append(f"{cost.obj}: {e}")
            continue
        rev = _callers(facts)
        by_base: dict[str, set[str]] = {}
        for name in facts:
            if is_cold(name):
                continue
            base = base_function(name)  # a patch edits the source function: scale, not scale.constprop.0
            if base not in by_base:
                try:
                    r = impact(idx, [base], with_callers=False)
                except InputError:
                    by_base[base] = set()
                    continue_with = by_base[base]
                else:
                    continue_with = set(r.functions)
                    for ent in r.entries:  # callers of the IPA clones reached, from the relocations
                        if ent.status == "replace" and ent.chain and ent.chain[-1].kind in ("constprop", "isra",
                                                                                            "part"):
                            continue_with |= rev.get(ent.name, set())
                    by_base[base] = continue_with
            funcs = by_base[base] | {name}
            callers = set(funcs)
            for n in funcs:
                callers |= rev.get(n, set())
            res[name] = (len(funcs), len(callers))
    for f in cost.functions:
        bsz = sizes["built"].get(f.built_name or f.name) or (0, 0)
        fsz = sizes["flag"].get(f.name) or (0, 0)
        f.impact_built, f.impact_built_callers = bsz
        f.impact_flag = fsz[0]
