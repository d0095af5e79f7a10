"""``klpforge diff``: the whole pipeline, read → correlate → compare → select → emit.

>>> res = run_diff(Path("orig/meminfo.o"), Path("patched/meminfo.o"), Path("out.o"),
...                DiffOptions(target="vmlinux", symtab=Path("vmlinux")))
>>> [f.old_name for f in res.patched_functions]
['meminfo_proc_show']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..elf import constants as C
from ..util.errors import InputError, NoChange, UnsafeChange
from ..util.fsutil import atomic_write
from .arch import arch_for
from .compare import CHANGED, NEW, compare
from .correlate import correlate
from .emit.livepatch import EmitOptions, KlpReloc, PatchedFunc, emit
from .layout import layout_refusals
from .model import Object
from .names import is_special_static
from .select import select
from .symtab import TargetSymtab, load_symvers

__all__ = ["DiffOptions", "DiffResult", "run_diff", "PatchedFunc", "check_pair"]


@dataclass
class DiffOptions:
    """Inputs besides the two objects. ``env`` holds entry sizes (``JUMP_STRUCT_SIZE`` ...); when None,
    they are taken from the process environment."""

    target: str = "vmlinux"
    symtab: Path | None = None
    symvers: Path | None = None
    env: Mapping[str, str] | None = None


@dataclass
class DiffResult:
    """What a diff produced: the replaced functions, every included symbol with its reason, the report."""

    patched_functions: list[PatchedFunc]
    changed: list[str]
    new: list[str]
    included_functions: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    klp_relocs: list[KlpReloc] = field(default_factory=list)
    callbacks: dict[str, str] = field(default_factory=dict)


def check_pair(a: Object, b: Object) -> None:
    """Refuse (:class:`InputError`) a pair whose machine, ELF class or byte order differ."""
    ea, eb = a.elf, b.elf
    for what, x, y in (("architecture", ea.arch, eb.arch), ("ELF class", ea.elfclass, eb.elfclass),
                       ("byte order", ea.endian, eb.endian)):
        if x != y:
            raise InputError(f"{a.path} and {b.path} differ in {what} ({x} vs {y}): "
                             "both must come from the same build")
    if ea.machine == C.EM_PPC64 and ea.endian == ">":
        # 6.1 ppc64 live patching needs -mprofile-kernel ftrace, which exists only for the ELFv2 (LE) ABI
        raise InputError(f"{a.path}: big-endian ppc64 (ELFv1) objects are not supported: the kernel live-patches "
                         "ppc64 only in little-endian ELFv2 builds")
    ca, cb = a.find_section(".comment"), b.find_section(".comment")
    if ca is not None and cb is not None and a.section_data(ca) != b.section_data(cb):
        va = a.section_data(ca).split(b"\0")[0].decode(errors="replace")
        vb = b.section_data(cb).split(b"\0")[0].decode(errors="replace")
        raise InputError(f"{a.path} and {b.path} were built by different compilers ({va!r} vs {vb!r})")


def _check_not_lto_ir(obj: Object) -> None:
    """GCC's ``-flto -c`` objects, and ``-flto -r`` links without ``-flinker-output=nolto-rel``, hold only
    GIMPLE bytecode (``.gnu.lto_*`` sections) and no machine code: there is nothing to diff."""
    if not any(n.startswith(".gnu.lto_") for n in obj.sec_names):
        return
    has_code = any(obj.is_text(s) and int(obj.shdrs["size"][s]) for s in range(1, obj.nsec))
    if not has_code and not (obj.defined & (obj.stype == C.STT_FUNC)).any():
        raise InputError(f"{obj.path}: holds only LTO IR (GCC's .gnu.lto_* sections, no machine code): link "
                         "with -flinker-output=nolto-rel (or -ffat-lto-objects), or build without -flto")


def run_diff(orig: Path, patched: Path, out: Path | None, opts: DiffOptions) -> DiffResult:
    """Diff two objects and write the livepatch object to ``out`` (unless None).

    Raises :class:`InputError` (exit 1), :class:`UnsafeChange` (2) or :class:`NoChange` (3); on any of
    them nothing is written."""
    a, b = Object.load(orig), Object.load(patched)
    _check_not_lto_ir(a)
    _check_not_lto_ir(b)
    check_pair(a, b)
    arch = arch_for(a.elf.machine)
    env = dict(os.environ if opts.env is None else opts.env)
    env = {k: v for k, v in env.items() if k.endswith("_STRUCT_SIZE")}  # every ENV_NAMES value has this form
    corr = correlate(a, b)
    cmp = compare(corr, arch)
    sel = select(corr, cmp, arch)

    def fname(i: int) -> str:
        return b.sym_names[i]

    changed = sorted(fname(i) for i, s in cmp.status.items()
                     if s == CHANGED and b.stype[i] == C.STT_FUNC and i not in sel.ignored)
    new = sorted(fname(i) for i, s in cmp.status.items()
                 if s == NEW and b.stype[i] == C.STT_FUNC and not is_special_static(fname(i)))
    report: dict[str, Any] = {
        "orig": str(orig), "patched": str(patched), "arch": arch.name, "target": opts.target,
        "correlation": [{"orig": a.sym_names[o], "patched": b.sym_names[int(corr.o2p[o])], "why": w}
                        for o, w in sorted(corr.reasons.items())
                        if corr.o2p[o] >= 0 and a.stype[o] in (C.STT_FUNC, C.STT_OBJECT)],
        "changed": [{"name": fname(i), "why": cmp.why.get(i, "")} for i, s in sorted(cmp.status.items())
                    if s == CHANGED],
        "line_only": sorted(fname(i) for i in cmp.line_only),
        "new": new,
        "included": [{"name": fname(i), "type": "function" if b.stype[i] == C.STT_FUNC else "data",
                      "why": w} for i, w in sorted(sel.included.items(), key=lambda kv: fname(kv[0]))],
        "sections": {b.sec_names[s]: w for s, w in sorted(sel.sections.items())},
        "warnings": sel.warnings,
        "refusals": list(sel.refusals),
    }
    replaced = sorted({fname(i) for i in sel.included if b.stype[i] == C.STT_FUNC})
    layout_refused = layout_refusals(a, b, replaced, report["warnings"])  # struct layouts (klpforge/diff/layout.py)
    if layout_refused:
        report["refusals"] = [*report["refusals"], *layout_refused]
        raise UnsafeChange([*sel.refusals, *layout_refused])
    if sel.refusals:
        raise UnsafeChange(sel.refusals)
    if not sel.included:
        raise NoChange(f"no change found between {orig} and {patched}"
                       + (f" (only __LINE__ values moved in {', '.join(report['line_only'])})"
                          if report["line_only"] else ""))
    if opts.symtab is None:
        raise InputError("--symtab is required: the symbol table of the object being patched "
                         "(vmlinux, the module .ko, or `readelf -s --wide` output)")
    st = TargetSymtab.load(opts.symtab, is_module=opts.target != "vmlinux")
    symvers = load_symvers(opts.symvers) if opts.symvers else None
    res = emit(corr, cmp, sel, arch, EmitOptions(opts.target, st, symvers, env))
    if res.refusals:
        report["refusals"] = res.refusals
        raise UnsafeChange(res.refusals)
    included_funcs = sorted(fname(i) for i in sel.included if b.stype[i] == C.STT_FUNC)
    report["patched_functions"] = [{"old_name": f.old_name, "sympos": f.sympos, "new_symbol": f.new_symbol}
                                   for f in res.patched]
    report["klp_relocations"] = [r.__dict__ for r in res.klp_relocs]
    report["normal_externals"] = res.normal_externals
    report["special_sections"] = {k: {"kept": v[0], "total": v[1]} for k, v in res.special_kept.items()}
    report["carved_sections"] = {k: {"kept_bytes": v[0], "total_bytes": v[1]} for k, v in res.carved.items()}
    report["callbacks"] = res.callbacks
    if res.module_keyed:  # tracepoints/static calls keyed in a module, kept working without table entries
        report["module_keyed_entries"] = res.module_keyed
    if out is not None:
        atomic_write(out, res.data)
    return DiffResult(res.patched, changed, new, included_funcs, report, res.klp_relocs, res.callbacks)
