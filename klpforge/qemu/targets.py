"""Which objects a live-patch module patches, read from the ``.ko`` before it is booted.

``verify`` needs them to load a shipped module the patch targets, and to say which one is missing; the guest
then checks the kernel's own view (``/sys/kernel/livepatch/<patch>/<object>/patched``, Linux 6.1
``kernel/livepatch/core.c``), which holds for any live patch, whoever built it.

Sources, best first:

1. the static ``klp_object`` array a klpforge module carries (``klpforge_objs``, written by
   :func:`klpforge.kbuild.module.module_source`): each entry's ``name`` (NULL = vmlinux) and ``funcs``
   pointers are relocations, so the names are read through them (``struct klp_object``/``struct klp_func`` of
   Linux 6.1 ``include/linux/livepatch.h``: ``name`` and ``old_name`` are the first members, ``funcs`` and
   ``new_func`` the second; the entry size is the array size over the entries counted, terminator included);
2. otherwise the objects named by ``.klp.rela.<object>.<section>`` sections and ``.klp.sym.<object>.<name>,<pos>``
   symbols (any livepatch module with klp relocations; its functions are then unknown).

>>> [t.name for t in patch_targets(Path("livepatch-nfsd-fix.ko"))]   # doctest: +SKIP
['vmlinux', 'nfsd']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, SymbolTableSection

from ..errors import InputError

__all__ = ["PatchTarget", "patch_targets", "module_targets"]


@dataclass
class PatchTarget:
    """One ``klp_object``: ``name`` is ``vmlinux`` or a module name (``_`` as the kernel spells it); ``funcs``
    the replaced functions (``name`` or ``name,sympos``); ``known`` is False when the functions could not be
    read (source 2 above)."""

    name: str
    funcs: list[str] = field(default_factory=list)
    known: bool = True


def _cstring(sec: Section, off: int) -> str:
    data = sec.data()
    end = data.find(b"\0", off)
    return data[off:end if end >= 0 else len(data)].decode(errors="replace")


def _klpforge_objects(elf: ELFFile) -> list[PatchTarget] | None:
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return None
    syms = list(symtab.iter_symbols())
    arr = next((s for s in syms if s.name == "klpforge_objs" and s["st_info"]["type"] == "STT_OBJECT"), None)
    if arr is None or not isinstance(arr["st_shndx"], int):
        return None
    shndx = arr["st_shndx"]
    rela = next((r for r in elf.iter_sections() if isinstance(r, RelocationSection)
                 and r["sh_info"] == shndx), None)
    if rela is None:
        return None
    # what each pointer in the data section points at: (section index, offset inside it)
    targets: dict[int, tuple[int, int]] = {}
    for r in rela.iter_relocations():
        s = syms[r["r_info_sym"]]
        if isinstance(s["st_shndx"], int):
            targets[r["r_offset"]] = (s["st_shndx"], s["st_value"] + r["r_addend"])
    by_place = {(s["st_shndx"], s["st_value"]): s for s in syms
                if s["st_info"]["type"] == "STT_OBJECT" and isinstance(s["st_shndx"], int)}
    lo, hi = arr["st_value"], arr["st_value"] + arr["st_size"]
    # the funcs member of each entry points at a klp_func array of the same section
    funcs_at = sorted(off for off, (sec, val) in targets.items() if lo <= off < hi and sec == shndx
                      and (sec, val) in by_place and by_place[(sec, val)].name.startswith("klpforge_funcs_"))
    if not funcs_at:
        return None
    stride = arr["st_size"] // (len(funcs_at) + 1)
    if funcs_at != [lo + k * stride + 8 for k in range(len(funcs_at))]:
        return None  # not the layout this reader knows: fall back to the klp sections
    out: list[PatchTarget] = []
    for off in funcs_at:
        name_ptr = targets.get(off - 8)  # name precedes funcs (both pointers, 8 bytes on 64-bit)
        name = _cstring(elf.get_section(name_ptr[0]), name_ptr[1]) if name_ptr else "vmlinux"
        fsym = by_place[targets[off]]
        f_lo, f_hi = fsym["st_value"], fsym["st_value"] + fsym["st_size"]
        ptrs = sorted(o for o in targets if f_lo <= o < f_hi)
        # two pointers per klp_func (old_name, new_func); the terminator has none
        nfunc = len(ptrs) // 2
        fstride = fsym["st_size"] // (nfunc + 1) if nfunc else 0
        data = elf.get_section(shndx).data()
        funcs = []
        for k in range(nfunc):
            at = f_lo + k * fstride
            if at not in targets:
                continue
            fname = _cstring(elf.get_section(targets[at][0]), targets[at][1])
            pos = int.from_bytes(data[at + 16:at + 24], "little")  # old_sympos
            funcs.append(f"{fname},{pos}" if pos else fname)
        out.append(PatchTarget(name.replace("-", "_"), funcs))
    return out


def _klp_section_objects(elf: ELFFile) -> list[PatchTarget]:
    names: list[str] = []
    for sec in elf.iter_sections():
        if sec.name.startswith(".klp.rela."):
            obj = sec.name[len(".klp.rela."):].split(".", 1)[0]
            if obj not in names:
                names.append(obj)
    symtab = elf.get_section_by_name(".symtab")
    if isinstance(symtab, SymbolTableSection):
        for s in symtab.iter_symbols():
            if s.name.startswith(".klp.sym."):
                obj = s.name[len(".klp.sym."):].split(".", 1)[0]
                if obj not in names:
                    names.append(obj)
    return [PatchTarget(n, known=False) for n in names]


def patch_targets(ko: Path) -> list[PatchTarget]:
    """The objects ``ko`` patches (see the module docstring for the sources); ``[]`` when nothing says.

    Raises :class:`InputError` when ``ko`` is not a readable ELF file."""
    try:
        with ko.open("rb") as f:
            elf = ELFFile(f)
            if elf.elfclass != 64 or not elf.little_endian:
                return _klp_section_objects(elf)
            return _klpforge_objects(elf) or _klp_section_objects(elf)
    except (OSError, ELFError) as e:
        raise InputError(f"{ko}: not a readable kernel module ({e})") from None


def module_targets(ko: Path) -> list[str]:
    """The module names (not vmlinux) among :func:`patch_targets` that have functions or whose functions are
    unknown: the modules that must be loaded for the patch to do anything to them. ``[]`` for a file that is
    not a readable module (``verify`` refuses it later, with its own message)."""
    try:
        targets = patch_targets(ko)
    except InputError:
        return []
    return [t.name for t in targets if t.name != "vmlinux" and (t.funcs or not t.known)]
