"""``klpforge convert``: a linked livepatch module's references to non-exported symbols become klp relocations.

A live patch written in C (by hand in the style of the kernel's ``samples/livepatch``, or by
``klpforge extract``) calls static functions and uses variables of the running kernel that no module may
link against. Built with ``KBUILD_MODPOST_WARN=1`` such a module has *undefined* symbols that the module
loader cannot resolve. The kernel resolves them instead through livepatch relocations (6.1
``kernel/livepatch/core.c: klp_resolve_symbols``, ``Documentation/livepatch/module-elf-format.rst``):
each reference becomes an entry of a ``.klp.rela.<obj>.<section>`` section (``SHF_RELA_LIVEPATCH``)
against a ``.klp.sym.<obj>.<name>,<sympos>`` symbol (``SHN_LIVEPATCH``).

The conversion reuses the post-link step of ``klpforge build`` (:func:`klpforge.diff.emit.postlink.apply_klp`):
the converted symbols and their ordinary relocations are removed, each section that had one gets an
anchor symbol, and ``apply_klp`` writes the klp sections -- the same code that carries the binary diff's
klp relocations through the module link. ``sympos`` comes from :class:`klpforge.diff.symtab.TargetSymtab`, the
kernel's count (0 for a unique name, else the rank among same-named symbols).

Exported symbols (``__ksymtab_<name>`` in the target, or a line of ``--symvers``) stay ordinary
references. A name defined more than once in its object (a local in several files) needs its position:
``KLP_SYMPOS(obj, name, pos)`` in the source (``klpforge/data/klpforge_sympos.h``) or
``--sympos obj:name,pos``; without one it is refused, naming the candidates.

>>> convert_module(Path("livepatch-sample.ko"), Path("out.ko"), Path("vmlinux"))
ConvertResult(converted=[('vmlinux', 'version_proc_show', 0)], kept=['klp_enable_patch', ...])
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..diff.emit.postlink import apply_klp
from ..diff.symtab import TargetSymtab, load_symvers
from ..elf import ElfFile
from ..elf import constants as C
from ..elf.rewrite import Rewriter
from ..util.errors import InputError, UnsafeChange
from ..util.fsutil import atomic_write

__all__ = ["convert_module", "ConvertResult", "load_symbols", "parse_sympos", "MARKER_SECTION"]

#: Section of the ``KLP_SYMPOS`` markers (``klpforge/data/klpforge_sympos.h``); removed by the conversion.
MARKER_SECTION = ".klpforge.sympos"
_SYMPOS = re.compile(r"^(?:([A-Za-z0-9_-]+):)?([^,:\s]+),(\d+)$")


@dataclass
class ConvertResult:
    """``converted``: ``(object, name, sympos)`` per klp symbol written; ``kept``: undefined names left to
    the module loader (exported)."""

    converted: list[tuple[str, str, int]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def parse_sympos(spec: str, where: str = "--sympos") -> tuple[str | None, str, int]:
    """``[OBJ:]NAME,POS`` -> ``(obj or None, name, pos)``. Raises InputError on another shape.

    >>> parse_sympos("vmlinux:type_show,3")
    ('vmlinux', 'type_show', 3)
    """
    m = _SYMPOS.match(spec.strip())
    if not m:
        raise InputError(f"{where} {spec!r}: expected [OBJ:]NAME,POS (e.g. vmlinux:type_show,2)")
    obj = m.group(1).replace("-", "_") if m.group(1) else None
    return obj, m.group(2), int(m.group(3))


def load_symbols(path: Path, is_module: bool) -> TargetSymtab:
    """The symbols of vmlinux or a module: an ELF file, ``readelf -s --wide`` text or a ``/proc/kallsyms``
    capture (its vmlinux lines; converted by :func:`klpforge.distro.symbols.kallsyms_to_readelf`)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise InputError(f"--symbols {path}: cannot read: {e.strerror}") from None
    first = head.decode(errors="replace").lstrip().split("\n", 1)[0].split()
    if head[:4] != b"\x7fELF" and len(first) == 3 and re.fullmatch(r"[0-9a-fA-F]{8,16}", first[0]) \
            and len(first[1]) == 1:
        from ..distro.symbols import kallsyms_to_readelf

        text = kallsyms_to_readelf(path.read_text(errors="replace"))
        with tempfile.NamedTemporaryFile("w", prefix="klpforge-kallsyms-", suffix=".txt") as tf:
            tf.write(text)
            tf.flush()
            st = TargetSymtab.load(tf.name, is_module)
        st.path = str(path)
        return st
    return TargetSymtab.load(path, is_module)


def _modinfo(elf: ElfFile) -> list[str]:
    i = elf.find_section(".modinfo")
    return [] if i is None else [s.decode(errors="replace") for s in elf.section_bytes(i).split(b"\0") if s]


def _markers(elf: ElfFile) -> list[str]:
    i = elf.find_section(MARKER_SECTION)
    return [] if i is None else [s.decode(errors="replace") for s in elf.section_bytes(i).split(b"\0") if s]


class _Targets:
    """vmlinux and (lazily) the modules of ``--module-symbols`` directories, by object name."""

    def __init__(self, vmlinux: TargetSymtab, module_dirs: Sequence[Path]):
        self.syms: dict[str, TargetSymtab] = {"vmlinux": vmlinux}
        self._paths: dict[str, Path] = {}
        for d in module_dirs:
            for p in sorted(Path(d).rglob("*.ko")):
                self._paths.setdefault(p.name[:-3].replace("-", "_"), p)
        self._loaded = False

    def objects(self, name: str) -> list[str]:
        """Objects that define ``name`` (vmlinux first)."""
        if not self._loaded:
            for obj, p in self._paths.items():
                self.syms.setdefault(obj, TargetSymtab.load(p, is_module=True))
            self._loaded = True
        return [o for o, st in self.syms.items() if st.has(name)]


def _positions(st: TargetSymtab, name: str) -> list[str]:
    """The candidates of an ambiguous name as ``name,POS (file)`` in the kernel's sympos order (the order
    :meth:`TargetSymtab.sympos` counts: address order for vmlinux, table order for a module)."""
    idx = [i for i, n in enumerate(st.names) if n == name and st.defined[i]
           and st.types[i] not in (C.STT_SECTION, C.STT_FILE)]
    order = sorted(idx, key=(lambda i: i) if st.is_module else (lambda i: (st.values[i], i)))
    out = []
    for pos, i in enumerate(order, 1):
        f = st.names[st.scope[i]] if st.scope[i] >= 0 else f"{st.values[i]:#x}"
        out.append(f"{name},{pos} ({f})")
    return out


def convert_module(ko: Path, out: Path, symbols: Path, module_dirs: Sequence[Path] = (),
                   symvers: Sequence[Path] = (), sympos: Mapping[tuple[str | None, str], int] | None = None,
                   allow_none: bool = False) -> ConvertResult:
    """Write ``out``: ``ko`` with its references to non-exported symbols as klp relocations.

    ``symbols``: vmlinux (ELF), ``readelf -s --wide`` text of it, or ``/proc/kallsyms``; ``module_dirs``:
    directories whose ``*.ko`` (any depth; object name = file name with ``-`` as ``_``) are the other
    targets; ``symvers``: ``Module.symvers`` files naming more exports; ``sympos``: ``(obj or None, name)
    -> pos`` (command line; markers in the module add to it); ``allow_none``: a module without such
    references is written as it is (less its markers) instead of refused (``build --from-source``). Raises
    :class:`InputError` (not a livepatch module, a symbol no target defines, a position out of range) or
    :class:`UnsafeChange` (an ambiguous name without a position). ``out`` is written whole or not at all."""
    elf = ElfFile.open(ko, require_rel=True)
    if "livepatch=Y" not in _modinfo(elf):
        raise InputError(f"{ko}: not a livepatch module (no MODULE_INFO(livepatch, \"Y\")): the kernel applies "
                         "klp relocations only to live patches")
    if elf.symtab_index is None:
        raise InputError(f"{ko}: has no symbol table (stripped?)")
    given: dict[tuple[str | None, str], int] = dict(sympos or {})
    for s in _markers(elf):
        obj, name, pos = parse_sympos(s, f"{ko}: KLP_SYMPOS marker")
        given.setdefault((obj, name), pos)
    targets = _Targets(load_symbols(Path(symbols), is_module=False), module_dirs)
    exported: set[str] = set()
    for sv in symvers:
        exported |= set(load_symvers(sv))

    def is_exported(name: str) -> bool:
        return name in exported or any(st.has(f"__ksymtab_{name}") for st in targets.syms.values())

    res = ConvertResult()
    convert: dict[int, str] = {}  # symbol index -> .klp.sym name
    kinds = elf.syms["shndx"]
    for i, name in enumerate(elf.sym_names):
        if i == 0 or not name or int(kinds[i]) != C.SHN_UNDEF or elf.sym_special[i]:
            continue
        if is_exported(name):
            res.kept.append(name)
            continue
        objs = targets.objects(name)
        wanted = [o for (o, n) in given if n == name and o is not None]
        if wanted:
            objs = [o for o in objs if o in wanted] or wanted
        if not objs:
            raise InputError(f"{ko}: undefined symbol {name} is neither exported nor defined in {symbols}"
                             + (" or the modules of --module-symbols" if module_dirs else ""))
        if len(objs) > 1:
            raise UnsafeChange(f"{ko}: {name} is defined in {', '.join(objs)}: say which with "
                               f"KLP_SYMPOS(OBJ, {name}, POS) or --sympos OBJ:{name},POS")
        obj = objs[0]
        st = targets.syms.get(obj)
        if st is None:
            raise InputError(f"{ko}: {name}: no symbols of object {obj} (give its .ko under --module-symbols)")
        cands = _positions(st, name)
        pos_given = given.get((obj, name), given.get((None, name)))
        if pos_given is None:
            if len(cands) > 1:
                raise UnsafeChange(f"{ko}: {name} names {len(cands)} symbols of {obj}: {'; '.join(cands)}; "
                                   f"give the position with KLP_SYMPOS({obj}, {name}, POS) or "
                                   f"--sympos {obj}:{name},POS")
            pos = 0
        elif pos_given > len(cands) or (pos_given == 0 and len(cands) > 1):
            raise InputError(f"{ko}: position {pos_given} of {name} in {obj}: it has {len(cands)} symbol(s) "
                             f"of that name ({'; '.join(cands)})")
        else:
            pos = pos_given
        convert[i] = f".klp.sym.{obj}.{name},{pos}"
        res.converted.append((obj, name, pos))
    if not convert and allow_none:
        _strip(elf, ko, convert, out)
        return res
    if not convert:
        raise InputError(f"{ko}: no reference to a non-exported symbol: nothing to convert")
    relocs = _strip(elf, ko, convert, out)
    try:
        vmlinux = Path(symbols) if Path(symbols).read_bytes()[:4] == b"\x7fELF" else None
        apply_klp(out, {"source": str(ko), "relocations": relocs}, vmlinux)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return res


def _strip(elf: ElfFile, ko: Path, convert: Mapping[int, str], out: Path) -> list[dict[str, Any]]:
    """Write ``out``: ``ko`` without the converted symbols (the rewrite drops their relocations), without
    the marker section, with one anchor per section that referred to them; return the relocations as a
    :mod:`klpforge.diff.emit.postlink` sidecar."""
    tag = hashlib.blake2b(str(ko.resolve()).encode(), digest_size=6).hexdigest()
    relocs: list[dict[str, Any]] = []
    anchors: dict[int, str] = {}
    for rsec, tgt in ((r, int(elf.shdrs["info"][r])) for r in range(1, elf.shnum)
                      if int(elf.shdrs["type"][r]) in (C.SHT_RELA, C.SHT_REL)):
        rows = elf.relocs(rsec)
        hit = [x for x in rows if int(x["sym"]) in convert]
        if not hit:
            continue
        secname = elf.section_names[tgt]
        if not int(elf.shdrs["flags"][tgt]) & C.SHF_ALLOC:
            raise InputError(f"{ko}: {secname} (not loaded) refers to {convert[int(hit[0]['sym'])]}")
        if int(elf.shdrs["type"][rsec]) == C.SHT_REL:
            raise InputError(f"{ko}: {elf.section_names[rsec]}: SHT_REL relocations (klp needs RELA)")
        anchor = anchors.setdefault(tgt, f"__klpf_anchor_{tag}_{tgt}")
        obj_of = {i: s[len(".klp.sym."):].split(".", 1)[0] for i, s in convert.items()}
        for x in hit:
            relocs.append({"anchor": anchor, "section": secname, "offset": int(x["offset"]),
                           "type": int(x["type"]), "symbol": convert[int(x["sym"])],
                           "addend": int(x["addend"]), "obj": obj_of[int(x["sym"])]})
    rw = Rewriter(elf, drop_section=lambda i, n: n == MARKER_SECTION or n == ".rela" + MARKER_SECTION,
                  drop_symbol=lambda i, n: i in convert)
    for tgt, name in anchors.items():
        rw.writer.add_symbol(name, rw.sec_map[tgt], 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
    atomic_write(out, rw.build(), mode=os.stat(ko).st_mode & 0o777)
    return relocs
