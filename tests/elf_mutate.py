"""Seeded, structure-aware corruption of real relocatable objects, shared by the fuzz test and
``bench/bench_fuzz.py``.

:func:`mutate` picks one of several strategies: an ELF header field, a section header field, a symbol
field, a relocation field (each set to a value chosen to hit a boundary: 0, the section count, the
reserved section indices, values near 2^64, odd and negative sizes), raw bytes in the tables, or a
truncation. Locations come from reading the *unmodified* object with klpforge's own reader.
"""

from __future__ import annotations

import contextlib
import io
import random
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klpforge.elf import ElfFile
from klpforge.elf import constants as C

__all__ = ["Layout", "layout", "mutate", "Outcome", "run_mutated", "check_output"]


@dataclass
class Layout:
    """Where the tables of one object are (byte offsets into the file)."""

    data: bytes
    is64: bool
    end: str
    shoff: int
    shnum: int
    symtab: int | None
    sym_off: int
    nsym: int
    relas: list[tuple[int, int, int]]  # (section index, offset, entry count)


def layout(data: bytes) -> Layout:
    """Read ``data`` (a valid object) and note where its headers, symbols and relocations live."""
    e = ElfFile(data)
    relas = []
    for i in np.flatnonzero((e.shdrs["type"] == C.SHT_RELA) | (e.shdrs["type"] == C.SHT_REL)).tolist():
        ent = int(e.shdrs["entsize"][i]) or (24 if e.is64 else 12)
        relas.append((i, int(e.shdrs["offset"][i]), int(e.shdrs["size"][i]) // ent))
    st = e.symtab_index
    return Layout(data, e.is64, e.endian, e.shoff, e.shnum, st,
                  int(e.shdrs["offset"][st]) if st is not None else 0, len(e.syms), relas)


def _put(b: bytearray, off: int, width: int, end: str, value: int) -> None:
    value &= (1 << (8 * width)) - 1
    b[off:off + width] = value.to_bytes(width, "little" if end == "<" else "big")


def _interesting(rng: random.Random, width: int, shnum: int, nsym: int) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice([
        0, 1, 2, 3, 7, shnum - 1, shnum, shnum + 1, nsym, nsym + 1, C.SHN_LORESERVE, C.SHN_LIVEPATCH,
        C.SHN_ABS, C.SHN_COMMON, C.SHN_XINDEX, 0xFEFF, top, top - 1, top - 7, top >> 1, (top >> 1) + 1,
        1 << 31, 1 << 32, 0x1000, 0x10000, rng.randrange(top + 1),
    ])


# field offsets and widths per class: section header, symbol, relocation
_SHDR64 = {"name": (0, 4), "type": (4, 4), "flags": (8, 8), "offset": (24, 8), "size": (32, 8), "link": (40, 4),
           "info": (44, 4), "addralign": (48, 8), "entsize": (56, 8)}
_SHDR32 = {"name": (0, 4), "type": (4, 4), "flags": (8, 4), "offset": (16, 4), "size": (20, 4), "link": (24, 4),
           "info": (28, 4), "addralign": (32, 4), "entsize": (36, 4)}
_SYM64 = {"name": (0, 4), "info": (4, 1), "shndx": (6, 2), "value": (8, 8), "size": (16, 8)}
_SYM32 = {"name": (0, 4), "value": (4, 4), "size": (8, 4), "info": (12, 1), "shndx": (14, 2)}
_TYPES = [C.SHT_NULL, C.SHT_PROGBITS, C.SHT_SYMTAB, C.SHT_STRTAB, C.SHT_RELA, C.SHT_NOBITS, C.SHT_REL,
          C.SHT_GROUP, C.SHT_SYMTAB_SHNDX, C.SHT_NOTE]


def mutate(lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One corrupted copy of ``lay.data`` and a short description of what was changed."""
    b = bytearray(lay.data)
    end, w = lay.end, (8 if lay.is64 else 4)
    r = rng.random()
    if r < 0.08:  # ELF header
        hdr = ([("e_shoff", 0x28, 8), ("e_shnum", 0x3C, 2), ("e_shstrndx", 0x3E, 2), ("e_shentsize", 0x3A, 2)]
               if lay.is64 else
               [("e_shoff", 0x20, 4), ("e_shnum", 0x30, 2), ("e_shstrndx", 0x32, 2), ("e_shentsize", 0x2E, 2)])
        name, off, width = rng.choice([*hdr, ("ei_class", 4, 1), ("ei_data", 5, 1), ("e_type", 0x10, 2)])
        v = _interesting(rng, width, lay.shnum, lay.nsym)
        _put(b, off, width, end, v)
        return bytes(b), f"{name}={v:#x}"
    if r < 0.35:  # a section header field
        fields = _SHDR64 if lay.is64 else _SHDR32
        sec = rng.randrange(0, lay.shnum)
        name = rng.choice(list(fields))
        off, width = fields[name]
        v = rng.choice(_TYPES) if name == "type" and rng.random() < 0.6 else \
            _interesting(rng, width, lay.shnum, lay.nsym)
        if name in ("size", "offset") and rng.random() < 0.3:  # a little off: odd, short, one entry more
            h = lay.shoff + sec * (64 if lay.is64 else 40) + off
            cur = int.from_bytes(b[h:h + width], "little" if end == "<" else "big")
            v = cur + rng.choice([-1, 1, -8, 8, -24, 24, 3])
        _put(b, lay.shoff + sec * (64 if lay.is64 else 40) + off, width, end, v)
        return bytes(b), f"section[{sec}].{name}={v:#x}"
    if r < 0.65 and lay.nsym:  # a symbol field
        fields = _SYM64 if lay.is64 else _SYM32
        sym = rng.randrange(0, lay.nsym)
        name = rng.choice(list(fields))
        off, width = fields[name]
        base = lay.sym_off + sym * (24 if lay.is64 else 16)
        if name == "info":
            v = rng.randrange(256)
        elif name in ("value", "size") and rng.random() < 0.4:
            cur = int.from_bytes(b[base + off:base + off + width], "little" if end == "<" else "big")
            v = cur + rng.choice([-1, 1, 3, 1 << 20, -(1 << 20), (1 << (8 * width - 1))])
        else:
            v = _interesting(rng, width, lay.shnum, lay.nsym)
        _put(b, base + off, width, end, v)
        return bytes(b), f"symbol[{sym}].{name}={v:#x}"
    if r < 0.85 and lay.relas:  # a relocation field
        sec, off0, n = rng.choice(lay.relas)
        if n:
            k = rng.randrange(n)
            ent = 3 * w
            base = off0 + k * ent
            what = rng.choice(["offset", "sym", "type", "addend"])
            if what == "offset":
                v = _interesting(rng, w, lay.shnum, lay.nsym)
                _put(b, base, w, end, v)
            elif what == "addend":
                v = _interesting(rng, w, lay.shnum, lay.nsym)
                _put(b, base + 2 * w, w, end, v)
            else:
                info = int.from_bytes(b[base + w:base + 2 * w], "little" if end == "<" else "big")
                shift = 32 if lay.is64 else 8
                symi, typ = info >> shift, info & ((1 << shift) - 1)
                if what == "sym":
                    symi = rng.choice([0, lay.nsym - 1, lay.nsym, lay.nsym + 5, (1 << (w * 8 - shift)) - 1,
                                       rng.randrange(lay.nsym)])
                    v = symi
                else:
                    typ = v = rng.randrange(1 << min(shift, 16))
                _put(b, base + w, w, end, (symi << shift) | typ)
            return bytes(b), f"section[{sec}] rela[{k}].{what}={v:#x}"
    if r < 0.95:  # raw bytes somewhere in the file
        j = rng.randrange(0x10, len(b) - 8)
        b[j:j + 8] = rng.randbytes(8)
        return bytes(b), f"bytes@{j:#x}"
    cut = rng.randrange(0, len(b))
    return bytes(b[:cut]), f"truncated to {cut}"


@dataclass
class Outcome:
    """One mutated run: exit code, stderr, what was mutated, and what is wrong with the run (None: fine)."""

    rc: int
    stderr: str
    desc: str
    problem: str | None


def check_output(path: Path) -> str | None:
    """What is wrong with a written livepatch object: readelf's warnings or our validation's error."""
    from klpforge.elf.validate import validate
    from klpforge.util.errors import InputError

    r = subprocess.run(["readelf", "-aW", str(path)], capture_output=True, text=True, errors="replace",
                       check=False)
    if r.returncode or r.stderr.strip():
        return f"readelf -aW: rc {r.returncode}: {r.stderr.strip()[:300]}"
    try:
        validate(ElfFile.open(path))
    except InputError as e:
        return f"validate: {e}"
    return None


def run_mutated(orig: Path, patched: Path, side: str, data: bytes, desc: str, tmp: Path,
                env: dict[str, str]) -> Outcome:
    """``klpforge diff`` (in this process, through the CLI entry point) with ``side`` replaced by ``data``:
    'orig', 'patched', or 'symtab' (the original object standing in for the target's symbol table).
    Checks the promises: exit code in {0,1,2,3}, one stderr line naming the damaged file on exit 1, no
    output (or temporary file) left unless exit 0, and a valid output on exit 0."""
    from klpforge.cli import main

    bad = tmp / f"bad-{side}.o"
    bad.write_bytes(data)
    out = tmp / "lp.o"
    out.unlink(missing_ok=True)
    a, b = (bad, patched) if side == "orig" else (orig, bad) if side == "patched" else (orig, patched)
    args = ["diff", str(a), str(b), "-o", str(out), "--symtab", str(bad if side == "symtab" else orig), "-q"]
    for k, v in env.items():
        args += ["--entsize", f"{k}={v}"]
    err, sout = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a warning printed once per process would hide in a long run
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(sout):
            rc = main(args)
    text = err.getvalue()
    lines = text.strip().splitlines()
    problem = None
    leftovers = sorted(p.name for p in tmp.iterdir() if p.name != bad.name and p.name != out.name
                       and not p.name.startswith("bad-"))
    if rc not in (0, 1, 2, 3):
        problem = f"exit code {rc}"
    elif len(lines) != (0 if rc == 0 else 1):
        problem = f"{len(lines)} stderr lines"
    elif "internal error" in text or "Traceback" in text:
        problem = "internal error"
    elif rc == 1 and bad.name not in lines[0]:
        problem = "error line does not name the damaged file"
    elif leftovers:
        problem = f"left files {leftovers}"
    elif rc != 0 and out.exists():
        problem = "output left on failure"
    elif rc == 0:
        problem = check_output(out)
    out.unlink(missing_ok=True)
    return Outcome(rc, text.strip(), desc, problem)
