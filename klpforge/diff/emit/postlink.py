"""Carrying klp relocations through Kbuild's module link.

``ld`` neither keeps ``SHN_LIVEPATCH`` symbols nor ``SHF_RELA_LIVEPATCH`` sections (objtool's
``klp-post-link`` exists for the same reason), so the module builder links a *linkable* copy of each diff
output and puts the klp relocations back into the linked ``.ko`` afterwards:

1. :func:`strip_klp` removes ``.klp.rela.*`` and ``.klp.sym.*`` from a diff output and marks every
   section that had klp relocations with a unique global *anchor* symbol at offset 0; the relocations
   are returned as a JSON-serialisable sidecar, relative to the anchors.
2. :func:`apply_klp` finds each anchor in the linked ``.ko`` (wherever the linker placed the section)
   and writes ``.klp.rela.<obj>.<section>`` sections and ``.klp.sym.<obj>.<name>,<pos>`` symbols --
   for the sidecars of *all* objects of the patch in one rewrite (a rewrite drops the anchors it used).

A klp relocation against a symbol that a patch adds (``bind_inside``: a new global defined by another
object of the same patch, which the diff of one object sees only as undefined) is not looked up in the
running kernel, which has no such symbol: it becomes an ordinary relocation against the module's own
definition, applied by the module loader like any other.

>>> sc = strip_klp(Path("out.o"), Path("out.link.o"))
>>> apply_klp(Path("livepatch-fix.ko"), [sc], Path("vmlinux"))
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...elf import ElfFile
from ...elf import constants as C
from ...elf.rewrite import Rewriter
from ...elf.types import RELOC
from ...util.errors import InputError, UnsafeChange
from ...util.fsutil import atomic_write

__all__ = ["strip_klp", "apply_klp", "klp_symbol_name", "placeholder_name", "KlpSidecar"]

KlpSidecar = dict[str, Any]


def placeholder_name(obj: str, klp_sym: str) -> str:
    """The undefined symbol a klp relocation stands on during the link (:func:`strip_klp`): the kernel's
    own name for a unique vmlinux symbol (objtool decides by name whether a callee returns and whether a
    call is a static call: ``__SCT__*``), else a name of our own that no object defines.

    >>> placeholder_name("vmlinux", ".klp.sym.vmlinux.do_exit,0")
    'do_exit'
    >>> placeholder_name("kobject_example", ".klp.sym.kobject_example.foo_show,0")
    '__klpf_ref.kobject_example.foo_show,0'
    """
    pos = klp_sym.rsplit(",", 1)[-1]
    if obj == "vmlinux" and pos == "0":
        return klp_symbol_name(klp_sym)
    return f"__klpf_ref.{klp_sym[len('.klp.sym.'):]}"


def strip_klp(diff_obj: Path, linkable_obj: Path) -> KlpSidecar:
    """Write ``linkable_obj`` (``diff_obj`` without klp sections/symbols, plus anchors); return the sidecar.

    Each klp relocation stays in ``linkable_obj`` as an ordinary one against an undefined placeholder
    (:func:`placeholder_name`): whatever reads the linked module before :func:`apply_klp` -- objtool, which
    IBT kernels run on the linked module only (6.1 ``scripts/Makefile.lib`` ``delay-objtool``) -- sees
    every call and reference where it is, never a bare ``call .+5``."""
    elf = ElfFile.open(diff_obj, require_rel=True)
    # the path too: two objects of one patch may produce identical bytes, their anchors must differ
    tag = hashlib.blake2b(Path(diff_obj).read_bytes() + str(Path(diff_obj).resolve()).encode(),
                          digest_size=6).hexdigest()
    klp_secs = [i for i, n in enumerate(elf.section_names) if n.startswith(".klp.rela.")]
    relocs: list[dict[str, Any]] = []
    anchors: dict[int, str] = {}
    visible: dict[int, list[tuple[int, str, int, int]]] = defaultdict(list)
    for i in klp_secs:
        tgt = int(elf.shdrs["info"][i])
        anchor = anchors.setdefault(tgt, f"__klpf_anchor_{tag}_{tgt}")
        obj = elf.section_names[i][len(".klp.rela."):].split(".", 1)[0]
        for x in elf.relocs(i):
            sym = elf.sym_names[int(x["sym"])]
            ph = placeholder_name(obj, sym)
            relocs.append({"anchor": anchor, "section": elf.section_names[tgt], "offset": int(x["offset"]),
                           "type": int(x["type"]), "symbol": sym, "addend": int(x["addend"]), "obj": obj,
                           "placeholder": ph})
            visible[tgt].append((int(x["offset"]), ph, int(x["type"]), int(x["addend"])))
    rw = Rewriter(elf, drop_section=lambda i, n: n.startswith(".klp.rela."),
                  drop_symbol=lambda i, n: n.startswith(".klp.sym."))
    w = rw.writer
    for tgt, name in anchors.items():
        w.add_symbol(name, rw.sec_map[tgt], 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
    ph_sym: dict[str, int] = {}
    for tgt, entries in sorted(visible.items()):
        arr = np.zeros(len(entries), RELOC)
        for k, (off, ph, typ, add) in enumerate(sorted(entries)):
            h = ph_sym.get(ph)
            if h is None:
                h = ph_sym[ph] = w.add_symbol(ph, C.SHN_UNDEF, 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
            arr["offset"][k], arr["sym"][k], arr["type"][k], arr["addend"][k] = off, h, typ, add
        old = elf.reloc_sections.get(tgt)
        if old is not None and old in rw.sec_map and int(elf.shdrs["type"][old]) == C.SHT_RELA:
            w.extend_relocations(rw.sec_map[old], arr)
        else:
            w.add_relocations(rw.sec_map[tgt], arr, flags=C.SHF_INFO_LINK)
    atomic_write(linkable_obj, rw.build())
    return {"source": str(diff_obj), "relocations": relocs}


def klp_symbol_name(klp_sym: str) -> str:
    """The kernel symbol a ``.klp.sym.<obj>.<name>,<pos>`` symbol names.

    >>> klp_symbol_name(".klp.sym.vmlinux.saved_command_line,0")
    'saved_command_line'
    >>> klp_symbol_name(".klp.sym.kobject_example.foo.isra.0,1")
    'foo.isra.0'
    """
    rest = klp_sym[len(".klp.sym."):]
    return rest.split(".", 1)[1].rsplit(",", 1)[0] if "." in rest else rest.rsplit(",", 1)[0]


def apply_klp(ko: Path, sidecars: KlpSidecar | Sequence[KlpSidecar], vmlinux: Path | None = None,
              bind_inside: Iterable[str] = (),
              sealed: Callable[[str], dict[str, list[bool]]] | None = None) -> list[str]:
    """Add the klp relocations of every sidecar to the linked module ``ko`` (rewritten in place, atomically,
    once: each object's anchors are found in the same rewrite).

    ``bind_inside``: names of symbols the patch itself adds; a klp relocation against one of them that the
    module defines (globally) becomes a normal ``SHT_RELA`` entry against that definition. Returns those
    names. ``sealed``: target object name -> its functions whose ENDBR the kernel seals
    (:func:`klpforge.diff.emit.ibt.seal_lists` for a tree, ``sealed_in_image``/``sealed_in_module`` for a
    distribution kernel), called only for an object whose function's address the patch takes; without it,
    vmlinux's own list when ``vmlinux`` is given. Raises :class:`InputError` when an
    anchor is missing or a vmlinux klp symbol does not exist, :class:`UnsafeChange` for the address of a
    sealed function.
    """
    scs = [sidecars] if isinstance(sidecars, dict) else list(sidecars)
    elf = ElfFile.open(ko, require_rel=True)
    where = {n: i for i, n in enumerate(elf.sym_names) if n.startswith("__klpf_anchor_")}
    inside = set(bind_inside)
    defined = {n: i for i, n in enumerate(elf.sym_names)
               if n in inside and int(elf.syms["shndx"][i]) != C.SHN_UNDEF and not elf.sym_special[i]
               and int(elf.syms["info"][i]) >> 4 != C.STB_LOCAL}
    relocs = [r for sc in scs for r in sc["relocations"]]
    internal = [r for r in relocs if klp_symbol_name(r["symbol"]) in defined]
    external = [r for r in relocs if klp_symbol_name(r["symbol"]) not in defined]
    if vmlinux is not None and os.path.exists(vmlinux):
        _check_vmlinux(external, Path(vmlinux))
    # placeholders (strip_klp) still undefined after the link: their relocations become klp ones
    by_ph = {r["placeholder"]: r for r in relocs if "placeholder" in r}
    ph_idx = {i for i, n in enumerate(elf.sym_names) if n in by_ph and int(elf.syms["shndx"][i]) == C.SHN_UNDEF
              and not elf.sym_special[i]}
    placed: set[tuple[int, int]] = set()  # (section, offset) that a sidecar entry covers
    for r in relocs:
        a = where.get(r["anchor"])
        if a is None:
            raise InputError(f"{ko}: anchor {r['anchor']} of {r['section']} is missing after the link")
        placed.add((int(elf.syms["shndx"][a]), int(elf.syms["value"][a]) + int(r["offset"])))
    linked: set[tuple[int, int]] = set()  # places the link already relocates against a definition
    made: list[tuple[int, int, dict[str, Any], int, int]] = []  # relocations others (objtool) made
    for tgt, rs in elf.reloc_sections.items():
        if elf.section_names[rs].startswith(".klp.rela.") or tgt >= elf.shnum:
            continue
        rr = elf.relocs(rs)
        for off, sym, typ, add in zip(rr["offset"].tolist(), rr["sym"].tolist(), rr["type"].tolist(),
                                      rr["addend"].tolist(), strict=True):
            if sym in ph_idx:
                if (tgt, off) not in placed:
                    made.append((tgt, off, by_ph[elf.sym_names[sym]], typ, add))
            elif sym:
                linked.add((tgt, off))
    rw = Rewriter(elf, drop_symbol=lambda i, n: n.startswith("__klpf_anchor_") or i in ph_idx)
    w = rw.writer
    syms: dict[str, int] = {}
    groups: dict[tuple[str, int], list[tuple[int, int, int, int]]] = defaultdict(list)

    def klp_entry(r: dict[str, Any], sec: int, off: int, typ: int, add: int) -> None:
        h = syms.get(r["symbol"])
        if h is None:
            h = syms[r["symbol"]] = w.add_symbol(r["symbol"], C.SHN_LIVEPATCH, 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
        groups[(r["obj"], sec)].append((off, h, typ, add))

    for r in relocs:
        a = where[r["anchor"]]
        sec = int(elf.syms["shndx"][a])
        name = klp_symbol_name(r["symbol"])
        off = int(elf.syms["value"][a]) + int(r["offset"])
        data = elf.section_bytes(sec)
        if int(r["type"]) != 0 and any(data[off:off + 4]):  # x86 6.1 refuses to relocate non-zero places
            raise InputError(f"{ko}: klp relocation target {elf.section_names[sec]}+{off:#x} is not zero")
        if name in defined:
            if (sec, off) not in linked:  # the link bound the placeholder already when it had the name
                groups[("", sec)].append((off, rw.sym_map[defined[name]], int(r["type"]), int(r["addend"])))
            continue
        klp_entry(r, sec, off, int(r["type"]), int(r["addend"]))
    for sec, off, r, typ, add in made:
        if elf.section_names[sec] == ".static_call_sites" and "__SCT__" in r["symbol"]:
            # objtool in --module mode names the trampoline as the key of a static call whose key it cannot
            # see; 6.1 static_call_add_module() then looks the trampoline up among the exported ones and
            # refuses the module. Vmlinux klp relocations are applied at load, before that (5.8+): name the
            # key itself, as objtool does for vmlinux objects (the site is then left to its trampoline).
            r = {**r, "symbol": r["symbol"].replace("__SCT__", "__SCK__", 1)}
        klp_entry(r, sec, off, typ, add)
    if sealed is not None:
        _check_sealed(elf, relocs, where, sealed)
    elif vmlinux is not None and os.path.exists(vmlinux):
        from .ibt import seal_lists

        _check_sealed(elf, relocs, where, seal_lists({"vmlinux": Path(vmlinux)}))
    for (obj, sec), entries in sorted(groups.items()):
        handle = rw.sec_map[sec]
        arr = np.zeros(len(entries), RELOC)
        arr["offset"], arr["sym"], arr["type"], arr["addend"] = zip(*entries, strict=True)
        if not obj:  # ordinary relocations: into the section's own .rela section (ld reads only one)
            old = elf.reloc_sections.get(sec)
            if old is not None and old in rw.sec_map:
                w.extend_relocations(rw.sec_map[old], arr)
            else:
                w.add_relocations(handle, arr, flags=C.SHF_INFO_LINK)
            continue
        w.add_relocations(handle, arr, name=f".klp.rela.{obj}.{w.section_name(handle).lstrip('.')}",
                          flags=C.SHF_ALLOC | C.SHF_INFO_LINK | C.SHF_RELA_LIVEPATCH)
    atomic_write(ko, rw.build())
    return sorted({klp_symbol_name(r["symbol"]) for r in internal})


def _check_sealed(elf: ElfFile, relocs: list[dict[str, Any]], where: dict[str, int],
                  sealed: Callable[[str], dict[str, list[bool]]]) -> None:
    """Refuse (:class:`UnsafeChange`) code of the patch that takes the address of a function of its target
    (vmlinux, or a module: each has its own seal list) whose ENDBR the kernel sealed
    (:mod:`klpforge.diff.emit.ibt`); names both functions. ``sealed``: object name -> its sealed functions, called
    once per object the patch takes an address in. x86-64 only."""
    if elf.machine != C.EM_X86_64:
        return
    from ..secnames import is_special_section
    from .ibt import address_taken, sealed_refusals

    uses: dict[str, list[tuple[str, str, int]]] = {}
    for r in relocs:
        a = where[r["anchor"]]
        sec = int(elf.syms["shndx"][a])
        name = elf.section_names[sec]
        if is_special_section(name):
            continue
        off = int(elf.syms["value"][a]) + int(r["offset"])
        text = bool(int(elf.shdrs["flags"][sec]) & C.SHF_EXECINSTR)
        if address_taken(elf.section_bytes(sec), off, int(r["type"]), text):
            pos = int(r["symbol"].rsplit(",", 1)[-1])
            uses.setdefault(r["obj"], []).append((_function_at(elf, sec, off), klp_symbol_name(r["symbol"]), pos))
    lines = [line for obj, u in sorted(uses.items()) for line in sealed_refusals(u, sealed(obj), obj)]
    if lines:
        raise UnsafeChange(lines[0] if len(lines) == 1 else f"{len(lines)} sealed functions: " + "; ".join(lines))


def _function_at(elf: ElfFile, sec: int, off: int) -> str:
    """Name of the function symbol of ``sec`` covering ``off`` (its own name before a ``klpf_`` alias)."""
    best = ""
    for i, n in enumerate(elf.sym_names):
        if int(elf.syms["shndx"][i]) != sec or int(elf.syms["info"][i]) & 0xF != C.STT_FUNC:
            continue
        v, s = int(elf.syms["value"][i]), int(elf.syms["size"][i])
        if v <= off < v + max(s, 1) and (not best or best.startswith(("klpf_", "__pfx_", "__cfi_"))):
            best = n
    return best or f"{elf.section_names[sec]}+{off:#x}"


def _check_vmlinux(relocs: list[dict[str, Any]], vmlinux: Path) -> None:
    """Every vmlinux klp symbol must exist in the linked vmlinux, else the patch would fail to load."""
    names = {r["symbol"] for r in relocs if r["obj"] == "vmlinux"}
    if not names:
        return
    elf = ElfFile.open(vmlinux)
    have = set(elf.sym_names)
    missing = sorted(n for n in names if klp_symbol_name(n) not in have)
    if missing:
        raise InputError(f"{vmlinux}: has no symbol {klp_symbol_name(missing[0])} "
                         f"({len(missing)} klp symbol(s) unresolvable)")
