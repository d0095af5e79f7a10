"""The symbol table of the object being patched (vmlinux or a module) and the kernel's ``sympos``.

Read from an ELF file or from ``readelf -s --wide`` text. ``sympos`` is how the kernel tells same-named
local symbols apart (``kernel/livepatch/core.c: klp_find_callback``, 6.1): 0 when the name is unique,
else the 1-based rank among same-named symbols, in address order for vmlinux (kallsyms is sorted) and in
symbol-table order for a module.

>>> st = TargetSymtab.load("vmlinux", is_module=False)
>>> st.sympos("show_val_kb", file="meminfo.c", local=True)
0
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..elf import ElfFile
from ..elf import constants as C
from ..util.errors import InputError

__all__ = ["TargetSymtab", "AmbiguousSymbol", "load_symvers", "Export", "section_kind"]


class AmbiguousSymbol(InputError):
    """A local symbol exists several times in the target and the symbol table cannot tell which copy is
    the patched object's (a ``/proc/kallsyms`` capture has no FILE symbols): never guessed. ``--distro``
    builds then fetch the release's ``-dbg`` vmlinux (klpforge/distro/dbgsyms.py) and try again."""

    def __init__(self, msg: str, name: str, file: str):
        super().__init__(msg)
        self.name = name
        self.file = file

_TYPES = {"NOTYPE": C.STT_NOTYPE, "OBJECT": C.STT_OBJECT, "FUNC": C.STT_FUNC, "SECTION": C.STT_SECTION,
          "FILE": C.STT_FILE, "COMMON": C.STT_COMMON, "TLS": C.STT_TLS}
_BINDS = {"LOCAL": C.STB_LOCAL, "GLOBAL": C.STB_GLOBAL, "WEAK": C.STB_WEAK, "UNIQUE": 10}
_LINE = re.compile(r"^\s*\d+:\s+([0-9a-fA-F]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)(?:\s+\[[^\]]*\])?\s+(\S+)\s?(.*)$")


@dataclass
class TargetSymtab:
    """Names, addresses, types and FILE scopes of the target's symbols."""

    path: str
    is_module: bool
    names: list[str] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    binds: list[int] = field(default_factory=list)
    defined: list[bool] = field(default_factory=list)
    scope: list[int] = field(default_factory=list)  # index of the FILE symbol before each local, -1 else
    _by_name: dict[str, list[int]] = field(default_factory=dict)
    _rank: list[int] | None = None

    @classmethod
    def load(cls, path: str | Path, is_module: bool) -> TargetSymtab:
        """Read an ELF file (vmlinux, a .ko, an object) or ``readelf -s --wide`` output."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                head = f.read(4)
        except OSError as e:
            raise InputError(f"{p}: cannot read symbol table: {e.strerror}") from None
        st = cls(str(p), is_module)
        if head == b"\x7fELF":
            elf = ElfFile.open(p)
            if elf.symtab_index is None:
                raise InputError(f"{p}: has no symbol table (stripped?)")
            st.names = elf.sym_names
            st.values = elf.syms["value"].astype("int64").tolist()
            st.types = (elf.syms["info"] & 0xF).tolist()
            st.binds = (elf.syms["info"] >> 4).tolist()
            st.defined = (elf.syms["shndx"] != 0).tolist()
        else:
            st._parse_readelf(p)
        st._index()
        return st

    def _parse_readelf(self, p: Path) -> None:
        text = p.read_text(errors="replace")
        seen = False
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith(("Symbol table", "Num:")):
                continue
            m = _LINE.match(line)
            if not m:
                raise InputError(f"{p}:{lineno}: not a line of `readelf -s --wide` output: {line.strip()[:60]!r}")
            value, _size, typ, bind, _vis, ndx, name = m.groups()
            if typ not in _TYPES and not typ.startswith("<"):
                raise InputError(f"{p}:{lineno}: unknown symbol type {typ!r}")
            seen = True
            self.names.append(name.strip())
            self.values.append(int(value, 16))
            self.types.append(_TYPES.get(typ, C.STT_NOTYPE))
            self.binds.append(_BINDS.get(bind, C.STB_GLOBAL))
            self.defined.append(ndx != "UND")
        if not seen:
            raise InputError(f"{p}: no symbols found (expected an ELF file or `readelf -s --wide` output)")

    def _index(self) -> None:
        cur = -1
        by: dict[str, list[int]] = defaultdict(list)
        for i, (n, t, b) in enumerate(zip(self.names, self.types, self.binds, strict=True)):
            if t == C.STT_FILE:
                cur = i
            self.scope.append(cur if b == C.STB_LOCAL else -1)
            if self.defined[i] and t != C.STT_SECTION and t != C.STT_FILE and n:
                by[n].append(i)
        self._by_name = dict(by)

    def has(self, name: str) -> bool:
        return name in self._by_name

    def sympos(self, name: str, file: str, local: bool, siblings: frozenset[str] = frozenset(),
               kinds: Mapping[str, tuple[str, bool]] | None = None, kind: str = "") -> int:
        """The kernel's ``sympos`` for ``name`` defined in source ``file``.

        ``siblings`` (other local names of the same object) picks the right FILE block when several
        files share a name. Without FILE symbols (a kallsyms capture), ``kinds`` (every function/object
        name of the same object -> (its section kind, local?)) and ``kind`` (the section kind of ``name``:
        :func:`section_kind`) let :meth:`_by_neighbours` prove which copy it is. Raises InputError when
        the symbol cannot be found unambiguously: never a guess."""
        cands = self._by_name.get(name, [])
        if not cands:
            raise InputError(f"cannot find symbol {name} in the target symbol table {self.path}")
        if len(cands) == 1:
            return 0
        if not local:
            return 0
        mine = [i for i in cands if self.scope[i] >= 0 and self.names[self.scope[i]] == file]
        if len(mine) > 1 and siblings:
            blocks = {self.scope[i] for i in mine}
            score = {b: sum(1 for s in siblings for j in self._by_name.get(s, []) if self.scope[j] == b)
                     for b in blocks}
            best = max(score.values())
            mine = [i for i in mine if score[self.scope[i]] == best]
        nofile = not any(s >= 0 for s in self.scope)
        if not mine and kinds and nofile:
            mine = self._by_neighbours(cands, kinds, kind)
        if len(mine) != 1:
            why = ("it has no FILE symbols and no copy lies between two symbols found only in that object"
                   if nofile else f"{len(mine)} candidates in that file")
            need = "; pass a vmlinux with its FILE symbols (the -dbg package's) with --symbols" if nofile else ""
            raise AmbiguousSymbol(f"cannot tell which of {len(cands)} symbols named {name} belongs to {file} "
                                  f"in {self.path}: {why}{need}", name, file)
        order = sorted(cands, key=(lambda i: i) if self.is_module else (lambda i: (self.values[i], i)))
        return order.index(mine[0]) + 1

    def _by_neighbours(self, cands: list[int], kinds: Mapping[str, tuple[str, bool]], kind: str) -> list[int]:
        """Without FILE symbols (a ``/proc/kallsyms`` capture, a stripped module): the one candidate that lies
        between two *anchors*, names of the same object found exactly once in the target; [] otherwise.

        Why that proves it: the linker places each input section whole, so everything between two symbols
        of one input section belongs to it. For vmlinux (address order) both anchors must be of the
        candidate's section kind (``.text``, ``.data``, ``.bss``, ``.text.unlikely`` ...: one input section
        of the object each); for a module (symbol-table order) ld lists each input file's local symbols
        together, so any two local anchors do. A score of "most neighbours" is not used: near the boundary
        of two objects it picks the other object's copy (``_raw_spin_rq_lock_irqsave``, kernel/sched)."""
        if self._rank is None:
            idx = range(len(self.names))
            order = list(idx) if self.is_module else sorted(idx, key=lambda i: (self.values[i], i))
            self._rank = [0] * len(self.names)
            for r, i in enumerate(order):
                self._rank[i] = r
        rank = self._rank
        anchors = sorted(rank[self._by_name[n][0]] for n, (k, local) in kinds.items()
                         if len(self._by_name.get(n, ())) == 1 and (local if self.is_module else k == kind))
        proven = [c for c in cands if 0 < bisect.bisect_left(anchors, rank[c]) < len(anchors)
                  and rank[c] not in anchors]
        return proven if len(proven) == 1 else []


def section_kind(secname: str, symname: str) -> str:
    """The section a symbol of ``symname`` defined in ``secname`` (of an object built with
    ``-ffunction-sections -fdata-sections``) lands in when built without them: ``.text.foo`` -> ``.text``,
    ``.bss.x`` -> ``.bss``; other names (``.text.unlikely.foo`` -> ``.text.unlikely``, ``.sched.text``) as
    they are.

    >>> section_kind(".text.foo", "foo"), section_kind(".text.unlikely.foo", "foo"), section_kind(".sched.text", "f")
    ('.text', '.text.unlikely', '.sched.text')
    """
    if symname and secname.endswith("." + symname):
        return secname[:-len(symname) - 1]
    return secname


@dataclass(frozen=True)
class Export:
    """One ``Module.symvers`` line: who exports the symbol."""

    name: str
    module: str  # "vmlinux" or the module path


def load_symvers(path: str | Path) -> dict[str, Export]:
    """Parse ``Module.symvers`` (``crc<TAB>name<TAB>module<TAB>export-type[<TAB>namespace]``)."""
    p = Path(path)
    out: dict[str, Export] = {}
    try:
        text = p.read_text(errors="replace")
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) < 4:
            raise InputError(f"{p}:{lineno}: not a Module.symvers line (expected 4-5 tab-separated fields)")
        mod = f[2]
        out[f[1]] = Export(f[1], "vmlinux" if mod in ("vmlinux", "") else Path(mod).name.replace("-", "_"))
    return out
