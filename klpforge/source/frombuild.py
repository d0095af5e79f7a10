"""``klpforge build --from-source DIR``: compile extracted (and reviewed) sources, convert, cross-check.

1. ``DIR`` is copied to a temporary directory (Kbuild writes next to the sources; the user's directory
   stays as it is) and built with ``make -C BUILD M=tmp KBUILD_MODPOST_WARN=1 modules``.
2. :func:`klpforge.source.convert.convert_module` turns the references to non-exported symbols into klp
   relocations (symbols: the tree's vmlinux and modules, exports: its ``Module.symvers``).
3. The cross-check: every function the binary diff ships (``DIR/klpforge-extract.json``, its module
   ``DIR/binary-diff.ko``) must be in the source module with the same code after relocation: equal bytes
   outside relocated fields, and relocations equal entry by entry on offset, type and what they point at
   (a symbol by name, a klp symbol by object/name/position, a string by its content, a function of the
   module by its name). A missing function or a difference fails (exit 2) unless ``force``.

>>> build_from_source(Path("livepatch-fix"), Path("linux"), Path("build"), Path("fix.ko"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.names import canonical, clone_parent
from ..elf import ElfFile
from ..elf import constants as C
from ..kbuild.tree import KernelTree
from ..util.errors import InputError, UnsafeChange
from ..util.fsutil import atomic_write
from ..util.proc import run
from .clones import is_abi_clone
from .convert import ConvertResult, convert_module
from .extract import MANIFEST, new_symbol

__all__ = ["build_from_source", "FromSourceResult", "function_code", "function_pieces", "cross_check"]

#: x86-64 relocation types -> bytes they write (psABI); others 4
_WIDTH = {1: 8, 24: 8, 2: 4, 4: 4, 9: 4, 10: 4, 11: 4, 41: 4, 42: 4}
_PCREL = {2, 4, 9, 41, 42}
_CLONE_NUM = re.compile(r"\.\d+$")
#: the verdict of code that differs only in register allocation (:func:`_computation`): reported, passes
EQUIVALENT = "equivalent"


@dataclass
class FromSourceResult:
    """The module written, what convert did, and the cross-check: per function ``same`` or what differs."""

    output: Path
    converted: ConvertResult
    checks: dict[str, str] = field(default_factory=dict)
    forced: bool = False


Code = tuple[bytes, list[tuple[int, int, object]]]


def function_code(ko: Path, symbol: str, bare_klp: bool = False) -> Code:
    """The bytes of ``symbol`` in ``ko`` with relocated fields zeroed, and its relocations as
    ``(offset, type, target)``; ``target`` is a name (``.klp.sym`` names as they are, or with ``bare_klp``
    the plain name, to compare with an object file), or for a section symbol ``("str", bytes)`` for a
    string section, else ``(section, addend)``. A ``symbol`` with GCC's numbering (``foo.isra.0``) also
    matches another number (``foo.isra.1``): the module numbers its clones on its own. Raises InputError
    when the symbol is not a defined function of the module."""
    return function_pieces(ko, symbol, bare_klp)[""]


def function_pieces(ko: Path, symbol: str, bare_klp: bool = False) -> dict[str, Code]:
    """:func:`function_code` of ``symbol`` (key ``""``) and of each part GCC split out of it (key
    ``.cold``: ``foo.cold``, named after any name of the function, e.g. the local name behind klpforge's
    global alias): the cold part is code of the function too (GCC 12 ``-freorder-blocks-and-partition``
    moves unlikely blocks, such as a ``pr_info``, there)."""
    elf = ElfFile.open(ko)
    defined = [i for i, n in enumerate(elf.sym_names) if int(elf.syms["shndx"][i]) not in (0,)
               and not elf.sym_special[i] and int(elf.syms["info"][i]) & 0xF == C.STT_FUNC]
    idx = [i for i in defined if elf.sym_names[i] == symbol] or \
        [i for i in defined if canonical(elf.sym_names[i]) == canonical(symbol) != symbol]
    if not idx:
        raise InputError(f"{ko}: no function {symbol}")
    i = idx[0]
    at = (int(elf.syms["shndx"][i]), int(elf.syms["value"][i]))
    names = {canonical(elf.sym_names[j]) for j in defined
             if (int(elf.syms["shndx"][j]), int(elf.syms["value"][j])) == at}
    out = {"": _code(elf, i, bare_klp)}
    for j in defined:
        parent = clone_parent(elf.sym_names[j])
        if parent is not None and canonical(parent) in names:
            out[".cold"] = _code(elf, j, bare_klp)
    return out


def _code(elf: ElfFile, i: int, bare_klp: bool) -> Code:
    sec, lo = int(elf.syms["shndx"][i]), int(elf.syms["value"][i])
    hi = lo + int(elf.syms["size"][i])
    code = bytearray(elf.section_bytes(sec)[lo:hi])
    relocs: list[tuple[int, int, object]] = []
    rsec = elf.reloc_sections.get(sec)
    rows = list(elf.relocs(rsec)) if rsec is not None else []
    for k, n in enumerate(elf.section_names):
        if n.startswith(".klp.rela.") and int(elf.shdrs["info"][k]) == sec:
            rows += list(elf.relocs(k))
    for x in rows:
        off = int(x["offset"])
        if not lo <= off < hi:
            continue
        t = int(x["type"])
        w = _WIDTH.get(t, 4)
        code[off - lo:off - lo + w] = bytes(w)
        s = int(x["sym"])
        target: object = elf.sym_names[s]
        add = int(x["addend"])
        if int(elf.syms["info"][s]) & 0xF == C.STT_SECTION:
            tsec = int(elf.syms["shndx"][s])
            tname = elf.section_names[tsec]
            if int(elf.shdrs["flags"][tsec]) & 0x20:  # SHF_STRINGS: a string by its content, wherever merged
                at = add + (4 if t in _PCREL else 0)
                data = elf.section_bytes(tsec)
                end = data.find(b"\0", at)
                target = ("str", data[at:end if end >= 0 else len(data)])
            else:
                objs = _objects_at(elf, tsec, add, t in _PCREL)
                target = ("objs", objs) if objs else (tname, add)
        else:
            name = str(target)
            if bare_klp and name.startswith(".klp.sym."):  # .klp.sym.<obj>.<name>,<pos>
                name = name[len(".klp.sym."):].split(".", 1)[1].rsplit(",", 1)[0]
            target = (_CLONE_NUM.sub("", name), add)
        relocs.append((off - lo, 2 if t == 4 else t, target))  # PLT32 = PC32 in the kernel (S + A - P)
    return bytes(code), sorted(relocs, key=lambda r: (r[0], r[1]))


def _objects_at(elf: ElfFile, sec: int, add: int, pcrel: bool) -> frozenset[tuple[str, int]]:
    """What a section-relative reference may name: ``(object, addend relative to it)`` for each named
    object or function of ``sec`` at ``add`` .. ``add + 8`` (a PC-relative addend is the offset minus the
    rest of the instruction), names without GCC's ``.N`` numbering. One binary names ``__already_done.0``,
    the other its section."""
    hi = add + (8 if pcrel else 0)
    out = set()
    for i, n in enumerate(elf.sym_names):
        if n and int(elf.syms["shndx"][i]) == sec and int(elf.syms["info"][i]) & 0xF in (C.STT_OBJECT, C.STT_FUNC):
            v = int(elf.syms["value"][i])
            if add <= v <= hi or (not pcrel and v <= add < v + int(elf.syms["size"][i])):
                out.add((_CLONE_NUM.sub("", n), add - v))
    return frozenset(out)


def _match(a: object, b: object) -> bool:
    """Two relocation targets agree (a named object matches a section reference that may name it)."""
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if isinstance(x, tuple) and len(x) == 2 and x[0] == "objs" and isinstance(x[1], frozenset):
            if isinstance(y, tuple) and len(y) == 2 and y[0] == "objs":
                return bool(x[1] & y[1])
            return y in x[1]
    return False


def _local_name(target: object, aliases: dict[str, str]) -> object:
    """A function of the module by the name it replaces (the binary diff's and the source's symbol for
    one function differ only by klpforge's naming)."""
    if isinstance(target, tuple) and isinstance(target[0], str) and target[0] in aliases:
        return (aliases[target[0]], target[1])
    return target


def cross_check(binary_ko: Path, source_ko: Path, pairs: list[tuple[str, str, str]],
                references: Sequence[tuple[str, Path, str]] = ()) -> dict[str, str]:
    """``pairs``: ``(old_name, binary-diff symbol, source symbol)``; ``references``: ``(old_name, object,
    source symbol)`` for functions the source replaces and the binary diff does not (the callers of a
    clone), compared with ``old_name`` in that object (the binary diff's patched object). Returns old_name
    -> ``same`` or the first difference."""
    aliases_b = {b: o for o, b, _s in pairs}
    aliases_s = {s: o for o, _b, s in pairs} | {o: o for o, _b, _s in pairs} | \
        {s: o for o, _r, s in references} | {o: o for o, _r, _s in references}
    out: dict[str, str] = {}
    jobs = [(old, binary_ko, bsym, ssym, False) for old, bsym, ssym in pairs] + \
        [(old, ref, old, ssym, True) for old, ref, ssym in references]
    for old, bko, bsym, ssym, is_ref in jobs:
        what = f"the binary diff's object {bko.name}" if is_ref else "the binary-diff module"
        try:
            bpieces = function_pieces(bko, bsym)
        except InputError as e:
            out[old] = f"not in {what} ({e})"
            continue
        try:
            spieces = function_pieces(source_ko, ssym, bare_klp=is_ref)
        except InputError:
            out[old] = ("missing from the source module (the binary diff replaces it" +
                        ("; the compiler may have inlined the copied function into its callers)" if is_abi_clone(old)
                         else ")"))
            continue
        if bpieces.keys() != spieces.keys():
            out[old] = (f"its cold part (.cold) is {'only' if '.cold' in spieces else 'not'} in the source module, "
                        f"{'not' if '.cold' in spieces else 'only'} in {what}")
            continue
        out[old] = next((f"{verdict} (in its cold part)" if piece else verdict
                         for piece in sorted(bpieces) for verdict in [_compare(bpieces[piece], spieces[piece], what,
                                                                               aliases_b, aliases_s)]
                         if verdict != "same"), "same")
    return out


def _compare(b: Code, s: Code, what: str, aliases_b: dict[str, str], aliases_s: dict[str, str]) -> str:
    """``same`` or the first difference of two functions' code (:func:`function_code`)."""
    bcode, brel = b
    scode, srel = s
    bn = [(o, t, _local_name(x, aliases_b)) for o, t, x in brel]
    sn = [(o, t, _local_name(x, aliases_s)) for o, t, x in srel]
    if bcode != scode:
        where = (f"{len(scode)} bytes from source, {len(bcode)} in {what}" if len(bcode) != len(scode) else
                 f"at +{next(k for k in range(len(bcode)) if bcode[k] != scode[k]):#x} from {what}")
        if len(bn) == len(sn) and all(b[1] == s[1] and _match(b[2], s[2]) for b, s in zip(bn, sn, strict=True)) \
                and _computation(bcode) == _computation(scode):
            return (f"{EQUIVALENT}: code differs ({where}) only in register allocation and stack reloads, with the "
                    "same references in the same order: GCC compiled the source without the bodies of the file's "
                    "functions it calls (the original compile's IPA facts: ipa-modref, IPA-RA), so it assumed "
                    "less about them")
        return f"code differs: {where}"
    bad = next(((b, s) for b, s in zip(bn, sn, strict=False) if b[:2] != s[:2] or not _match(b[2], s[2])), None)
    if bad is not None:
        return f"relocation differs: {what} {bad[0]}, source {bad[1]}"
    if len(bn) != len(sn):
        return f"relocations differ: {len(bn)} in {what}, {len(sn)} from source"
    return "same"


#: x86-64 general registers in capstone's Intel syntax (``rax``, ``r14w``, ``sil`` ...)
_REG = re.compile(r"\b(?:[re]?(?:ax|bx|cx|dx|si|di|bp|sp)|[abcd][lh]|(?:si|di|bp|sp)l|r(?:[89]|1[0-5])[dwb]?)\b")
_BRANCH = {"call", "jmp"} | {f"j{c}" for c in ("a", "ae", "b", "be", "e", "ne", "g", "ge", "l", "le", "o", "no", "s",
                                                "ns", "p", "np", "rcxz", "ecxz")}


def _computation(code: bytes) -> list[str]:
    """The instructions of x86-64 ``code`` (capstone) less what register allocation decides: register
    names become ``R``; register-to-register moves, pushes and pops of registers, moves between a register
    and a stack slot (``[rsp + N]``: spills and reloads) and nops are left out; branch targets (relative to
    the function's own layout) become ``T``. Immediates and other memory displacements stay: two functions
    with equal lists do the same loads, stores, arithmetic and calls in the same order."""
    from ..diff.arch import arch_for
    from ..diff.disasm import instructions

    out = []
    for _size, mn, ops in instructions(arch_for(62), code):
        if mn.startswith("nop") or mn in ("push", "pop") and _REG.fullmatch(ops.strip()):
            continue
        if mn in ("mov", "movsxd", "movzx", "movsx"):
            a, _, b = ops.partition(", ")
            if all(_REG.fullmatch(x.strip()) or re.fullmatch(r"\w+ ptr \[rsp(?: \+ 0x[0-9a-f]+)?\]", x.strip())
                   for x in (a, b)):
                continue
        if mn in _BRANCH and re.fullmatch(r"0x[0-9a-f]+", ops.strip()):
            ops = "T"
        out.append(f"{mn} {_REG.sub('R', ops)}")
    return out


def build_from_source(srcdir: Path, src: Path, build: Path | None, output: Path, force: bool = False,
                      jobs: int = 1) -> FromSourceResult:
    """Compile ``srcdir`` against the tree, convert, cross-check, write ``output``. Raises InputError
    (build failure, no manifest), UnsafeChange (the cross-check failed and not ``force``)."""
    man_path = srcdir / MANIFEST
    try:
        manifest = json.loads(man_path.read_text())
        modname = str(manifest["module"])
        objects = list(manifest["objects"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{man_path}: not a klpforge extract manifest ({type(e).__name__}: {e})") from None
    tree = KernelTree(src, build)
    work = Path(tempfile.mkdtemp(prefix="klpforge-fromsrc-"))
    try:
        d = work / "m"
        shutil.copytree(srcdir, d, ignore=shutil.ignore_patterns("*.ko", "*.o", ".*.cmd"))
        log = work / "build.log"
        r = run(["make", "-C", str(tree.build), f"M={d}", f"-j{jobs}", "KBUILD_MODPOST_WARN=1", "modules"],
                capture_output=True, text=True)
        log.write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            err = next((ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower()), "make failed")
            raise InputError(f"{srcdir}: the sources do not compile: {err.strip()[:300]}")
        ko = d / f"{modname}.ko"
        conv = work / "converted.ko"
        mods = [tree.build] if any(o.get("target") != "vmlinux" for o in objects) else []
        cres = convert_module(ko, conv, tree.vmlinux, mods, [tree.symvers] if tree.symvers else [], allow_none=True)
        # the binary diff's functions; a clone it replaces is the module's own clone of the copied function
        pairs = [(f["old_name"], f.get("new_symbol") or f["old_name"],
                  f["old_name"] if is_abi_clone(f["old_name"]) else new_symbol(o["unit"], f["old_name"]))
                 for o in objects for f in o["functions"]]
        # what the source replaces and the binary diff does not (a clone's callers): the patched object's
        references = [(f["old_name"], srcdir / str(o.get("reference", "")), new_symbol(o["unit"], f["old_name"]))
                      for o in objects for f in o.get("source_functions", []) if f.get("compare") == "reference"]
        # the callbacks: the binary diff's copy of each
        pairs += [(c["function"], c["binary_symbol"], new_symbol(o["unit"], c["function"]))
                  for o in objects for c in o.get("callbacks", [])]
        checks = cross_check(srcdir / "binary-diff.ko", conv, pairs, references) \
            if (srcdir / "binary-diff.ko").is_file() \
            else {p[0]: "no binary-diff.ko to compare with" for p in [*pairs, *references]}
        bad = {k: v for k, v in checks.items() if v != "same" and not v.startswith(EQUIVALENT + ":")}
        if bad and not force:
            k, v = next(iter(bad.items()))
            raise UnsafeChange(f"cross-check with the binary diff failed for {len(bad)} function(s): {k}: {v} "
                               "(--force-source ships the reviewed source anyway)")
        atomic_write(output, conv.read_bytes())
        return FromSourceResult(output, cres, checks, bool(bad))
    finally:
        shutil.rmtree(work, ignore_errors=True)
