"""What a live-patch ``.ko`` says about itself: name, kernel release, targets, replaced functions, signature.

Read from the module file alone (no kernel needed):

* ``.modinfo``: ``name``, ``vermagic`` (its first word is the kernel release, ``UTS_RELEASE``),
  ``livepatch=Y`` (``MODULE_INFO(livepatch, "Y")``, required by Linux 4.x+ ``kernel/module/main.c``
  ``check_modinfo_livepatch``), and any ``klpforge*`` keys (provenance a build recorded).
* The ``klp_patch``/``klp_object``/``klp_func`` structures of a module klpforge generated
  (``klpforge/kbuild/module.py``): ``klpforge_objs`` and ``klpforge_funcs_<i>`` are local symbols; each
  pointer field is a relocation, so the layout is read without the kernel's struct sizes: in ``klp_object`` the
  ``name`` pointer sits one pointer before the ``funcs`` pointer (no relocation there = ``NULL`` = vmlinux),
  in ``klp_func`` ``old_name`` sits one pointer before ``new_func`` and ``old_sympos`` one after
  (``include/linux/livepatch.h``, unchanged since 4.x); ``klp_patch.replace`` is the byte after
  ``mod``, ``objs`` and ``states`` (5.5+).
* Modules built by other tools (kpatch-build) have other symbols: their objects come from the
  ``.klp.rela.<object>.<section>`` section names, functions are then unknown.
* A signature is the trailer ``~Module signature appended~\\n`` (``include/linux/module_signature.h``).

>>> inspect_module(Path("livepatch-fix.ko")).objects[0].name   # doctest: +SKIP
'vmlinux'
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from ..util.errors import InputError

__all__ = ["KlpFunc", "KlpObject", "PatchModule", "inspect_module", "SIGNATURE_MAGIC"]

#: trailer of a signed module (include/linux/module_signature.h, MODULE_SIG_STRING + "\n")
SIGNATURE_MAGIC = b"~Module signature appended~\n"


@dataclass
class KlpFunc:
    """One replaced function: its name in the target and its sympos (0: the only symbol of that name)."""

    name: str
    sympos: int = 0


@dataclass
class KlpObject:
    """One ``klp_object``: ``vmlinux`` or a module name, and the functions replaced in it."""

    name: str
    funcs: list[KlpFunc] = field(default_factory=list)


@dataclass
class PatchModule:
    """A live-patch module file as read from disk."""

    path: Path
    name: str
    vermagic: str
    livepatch: bool
    objects: list[KlpObject]
    #: ``klp_patch.replace`` (a cumulative patch that replaces every earlier one); None if unknown
    replace: bool | None
    signed: bool
    sha256: str
    modinfo: dict[str, str]
    #: how objects/functions were found: "klpforge" (the generated structures) or "klp-sections"
    source: str = "klpforge"

    @property
    def release(self) -> str:
        """The kernel release the module was built for (the first word of ``vermagic``)."""
        return self.vermagic.split(" ", 1)[0] if self.vermagic else ""

    @property
    def object_names(self) -> list[str]:
        """Target object names, ``vmlinux`` first as built."""
        return [o.name for o in self.objects]

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (paths as strings)."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["release"] = self.release
        return d


def _modinfo(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            out.setdefault(k, v)
    return out


class _Reader:
    """Pointer fields of the generated structures, resolved through the relocations."""

    def __init__(self, elf: ELFFile):
        self.elf = elf
        self.ptr = 8 if elf.elfclass == 64 else 4
        self.little = elf.little_endian
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise InputError("no symbol table")
        self.syms = list(symtab.iter_symbols())
        self.by_name = {s.name: s for s in self.syms if s.name}
        self._relocs: dict[int, dict[int, tuple[Any, int]]] = {}

    def relocs(self, shndx: int) -> dict[int, tuple[Any, int]]:
        """offset -> (symbol, addend) of the relocations applying to section ``shndx``."""
        if shndx not in self._relocs:
            table: dict[int, tuple[Any, int]] = {}
            for sec in self.elf.iter_sections():
                if isinstance(sec, RelocationSection) and sec["sh_info"] == shndx:
                    for r in sec.iter_relocations():
                        add = r["r_addend"] if r.is_RELA() else 0
                        table[r["r_offset"]] = (self.syms[r["r_info_sym"]], add)
            self._relocs[shndx] = table
        return self._relocs[shndx]

    def cstring(self, sym: Any, addend: int) -> str:
        sec = self.elf.get_section(sym["st_shndx"])
        data = sec.data()
        off = sym["st_value"] + addend
        end = data.find(b"\0", off)
        return data[off:end if end >= 0 else len(data)].decode(errors="replace")

    def word(self, shndx: int, off: int) -> int:
        data = self.elf.get_section(shndx).data()
        return int.from_bytes(data[off:off + self.ptr], "little" if self.little else "big")

    def is_code(self, sym: Any) -> bool:
        """``sym`` is a function or lies in an executable section."""
        if sym["st_info"]["type"] == "STT_FUNC":
            return True
        ndx = sym["st_shndx"]
        return isinstance(ndx, int) and bool(self.elf.get_section(ndx)["sh_flags"] & 0x4)  # SHF_EXECINSTR

    def byte(self, shndx: int, off: int) -> int:
        return self.elf.get_section(shndx).data()[off]


def _klpforge_objects(rd: _Reader) -> tuple[list[KlpObject], bool | None] | None:
    objs_sym = rd.by_name.get("klpforge_objs")
    if objs_sym is None:
        return None
    # the linker points relocations at section symbols (".data + 0x2e0"): resolve by address
    arrays = {(s["st_shndx"], s["st_value"]): s for s in rd.syms if s.name.startswith("klpforge_funcs_")}
    shndx, base, size = objs_sym["st_shndx"], objs_sym["st_value"], objs_sym["st_size"]
    rel = rd.relocs(shndx)
    objects: list[KlpObject] = []
    for off in sorted(o for o in rel if base <= o < base + size):
        target, add = rel[off]
        arr = arrays.get((target["st_shndx"], target["st_value"] + add))
        if arr is None:
            continue  # the name pointer, or a callback
        name_rel = rel.get(off - rd.ptr)
        name = rd.cstring(*name_rel) if name_rel else "vmlinux"
        fshndx, fbase, fsize = arr["st_shndx"], arr["st_value"], arr["st_size"]
        frel = rd.relocs(fshndx)
        funcs = []
        for foff in sorted(o for o in frel if fbase <= o < fbase + fsize):
            new, _ = frel[foff]
            old = frel.get(foff - rd.ptr)
            # new_func points into code; old_name (one pointer before) at a string
            if not rd.is_code(new) or old is None or rd.is_code(old[0]):
                continue
            funcs.append(KlpFunc(rd.cstring(*old), rd.word(fshndx, foff + rd.ptr)))
        objects.append(KlpObject(name, funcs))
    replace = None
    patch = rd.by_name.get("klpforge_patch")
    if patch is not None and patch["st_size"] > 3 * rd.ptr:
        replace = bool(rd.byte(patch["st_shndx"], patch["st_value"] + 3 * rd.ptr))
    return objects, replace


def _klp_section_objects(elf: ELFFile) -> list[KlpObject]:
    """Objects named by ``.klp.rela.<object>.<section>`` sections and ``.klp.sym.<object>.<name>,<pos>``
    symbols (any livepatch module with klp relocations; its functions are unknown)."""
    names: list[str] = []
    for sec in elf.iter_sections():
        if sec.name.startswith(".klp.rela."):
            obj = sec.name[len(".klp.rela."):].split(".", 1)[0]
            if obj not in names:
                names.append(obj)
    symtab = elf.get_section_by_name(".symtab")
    if isinstance(symtab, SymbolTableSection):
        for sym in symtab.iter_symbols():
            if sym.name.startswith(".klp.sym."):
                obj = sym.name[len(".klp.sym."):].split(".", 1)[0]
                if obj not in names:
                    names.append(obj)
    return [KlpObject(n) for n in names]


def inspect_module(ko: Path) -> PatchModule:
    """Read ``ko``. Raises :class:`InputError` for a missing file or one that is not a kernel module
    (no ``.modinfo``); a module without ``livepatch=Y`` is returned with ``livepatch=False`` (callers refuse)."""
    try:
        raw = ko.read_bytes()
    except OSError as e:
        raise InputError(f"{ko}: cannot read ({e.strerror})") from None
    try:
        elf = ELFFile(io.BytesIO(raw))
        sec = elf.get_section_by_name(".modinfo")
        if sec is None:
            raise InputError(f"{ko}: not a kernel module (no .modinfo section)")
        info = _modinfo(sec.data())
        rd = _Reader(elf)
        found = _klpforge_objects(rd)
        if found is not None:
            objects, replace, source = found[0], found[1], "klpforge"
        else:
            objects, replace, source = _klp_section_objects(elf), None, "klp-sections"
    except (ELFError, ValueError, IndexError, KeyError) as e:
        raise InputError(f"{ko}: not a readable kernel module ({e})") from None
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(str(ko)) else f"{ko}: {msg}") from None
    name = info.get("name") or ko.name.removesuffix(".ko").replace("-", "_")
    return PatchModule(
        path=ko, name=name, vermagic=info.get("vermagic", ""), livepatch=info.get("livepatch") == "Y",
        objects=objects, replace=replace, signed=raw.endswith(SIGNATURE_MAGIC),
        sha256=hashlib.sha256(raw).hexdigest(), modinfo=info, source=source)
