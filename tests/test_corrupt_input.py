"""Each kind of corruption the fuzz run found (issue 8, items 6 and 9), made on purpose in an object gcc
compiles during the test: one clear stderr line naming the file and what is wrong, exit 1, no output, no
numpy warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klpforge.elf import ElfFile
from klpforge.elf import constants as C

SRC_A = "int counter;\nstatic int helper(int x) { return x * 3 + counter; }\nint f(int x) { return helper(x) + 1; }\n"
SRC_B = SRC_A.replace("x * 3", "x * 5")


@pytest.fixture
def pair(cc) -> tuple[Path, Path]:
    return cc(SRC_A, "a", "-fno-inline"), cc(SRC_B, "b", "-fno-inline")


def _put(path: Path, off: int, width: int, value: int) -> None:
    b = bytearray(path.read_bytes())
    b[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    path.write_bytes(bytes(b))


def _sym(elf: ElfFile, name: str) -> int:
    return elf.sym_names.index(name)


def _sym_field(elf: ElfFile, i: int, field: str) -> tuple[int, int]:
    off = {"shndx": (6, 2), "value": (8, 8), "size": (16, 8)}[field]
    return int(elf.shdrs["offset"][elf.symtab_index]) + 24 * i + off[0], off[1]


def _shdr_field(elf: ElfFile, sec: int, field: str) -> tuple[int, int]:
    off = {"size": (32, 8), "link": (40, 4), "info": (44, 4)}[field]
    return elf.shoff + 64 * sec + off[0], off[1]


def _rela_text(elf: ElfFile) -> int:
    return next(i for i, n in enumerate(elf.section_names) if n.startswith(".rela.text"))


def _section_symbol(elf: ElfFile) -> int:
    return int(np.flatnonzero((elf.sym_type == C.STT_SECTION) & (elf.syms["shndx"] > 0))[0])


# (what to corrupt, expected words in the error line)
CASES = {
    "symbol section out of range": (lambda e: (*_sym_field(e, _sym(e, "f"), "shndx"), e.shnum + 3),
                                    "points at section"),
    "function in SHN_ABS": (lambda e: (*_sym_field(e, _sym(e, "f"), "shndx"), C.SHN_ABS),
                            "is a function symbol with section index SHN_ABS, not a section"),
    "section symbol in SHN_COMMON": (lambda e: (*_sym_field(e, _section_symbol(e), "shndx"), C.SHN_COMMON),
                                     "is a section symbol with section index SHN_COMMON"),
    "SHN_LORESERVE": (lambda e: (*_sym_field(e, _sym(e, "counter"), "shndx"), C.SHN_LORESERVE),
                      "has reserved section index 0xff00"),
    "value near 2^64": (lambda e: (*_sym_field(e, _sym(e, "f"), "value"), (1 << 64) - 16),
                        "negative or beyond 2^63"),
    "size past the section": (lambda e: (*_sym_field(e, _sym(e, "f"), "size"), 1 << 20),
                              "does not fit in section"),
    "negative size": (lambda e: (*_sym_field(e, _sym(e, "f"), "size"), -3), "negative or beyond 2^63"),
    "RELA sh_link 0": (lambda e: (*_shdr_field(e, _rela_text(e), "link"), 0),
                       "links to section 0, not the symbol table"),
    "RELA sh_link to a string table": (lambda e: (*_shdr_field(e, _rela_text(e), "link"), e.shstrndx),
                                       "not the symbol table"),
    "RELA sh_info out of range": (lambda e: (*_shdr_field(e, _rela_text(e), "info"), e.shnum + 7),
                                  "applies to section"),
    "RELA sh_info on the symbol table": (lambda e: (*_shdr_field(e, _rela_text(e), "info"), e.symtab_index),
                                         "which cannot be relocated"),
    "empty symtab": (lambda e: (*_shdr_field(e, e.symtab_index, "size"), 0), "is empty"),
    "odd symtab size": (lambda e: (*_shdr_field(e, e.symtab_index, "size"),
                                   int(e.shdrs["size"][e.symtab_index]) - 5), "is not a multiple of 24"),
    "section size wraps around 2^64": (lambda e: (*_shdr_field(e, _rela_text(e), "size"), -2),
                                       "extends past the end of the file"),
}


@pytest.mark.parametrize("side", ["orig", "patched"])
@pytest.mark.parametrize("case", list(CASES))
def test_corruption_is_one_clear_line(pair: tuple[Path, Path], tmp_path: Path, case: str, side: str) -> None:
    a, b = pair
    bad = tmp_path / f"bad-{side}.o"
    src = a if side == "orig" else b
    bad.write_bytes(src.read_bytes())
    where, expect = CASES[case]
    off, width, value = where(ElfFile.open(src))
    _put(bad, off, width, value)
    x, y = (bad, b) if side == "orig" else (a, bad)
    out = tmp_path / "lp.o"
    r = subprocess.run([sys.executable, "-W", "always", "-m", "klpforge", "diff", str(x), str(y), "-o", str(out),
                        "--symtab", str(a)], capture_output=True, text=True, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, r.stderr  # no numpy overflow warning before the error
    assert lines[0].startswith(f"klpforge diff: {bad}: "), lines[0]
    assert expect in lines[0], lines[0]
    assert not out.exists()


def test_uncorrupted_pair_passes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    # the same objects unmodified give a live patch that readelf and our validation accept
    from klpforge.elf.validate import validate

    a, b = pair
    out = tmp_path / "lp.o"
    r = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(out), "--symtab",
                        str(a), "-q"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    re = subprocess.run(["readelf", "-aW", str(out)], capture_output=True, text=True, check=True)
    assert re.stderr == ""
    validate(ElfFile.open(out))


def test_validate_refuses_a_livepatch_symbol_outside_klp_sym(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from klpforge.elf.validate import validate
    from klpforge.util.errors import InputError

    a, _ = pair
    bad = tmp_path / "bad.o"
    bad.write_bytes(a.read_bytes())
    e = ElfFile.open(a)
    _put(bad, *_sym_field(e, _sym(e, "counter"), "shndx"), C.SHN_LIVEPATCH)
    with pytest.raises(InputError, match=r"symbol \d+ \('counter'\) has reserved section index 0xff20"):
        validate(ElfFile.open(bad))


def test_control_characters_in_names_stay_on_one_line(cc, tmp_path: Path) -> None:
    # a damaged string table can put a newline into a symbol name that a refusal then quotes
    objs = []
    for name, v in (("a", 1), ("b", 2)):
        o = cc(f"int limit = {v};\nint g(void) {{ return limit; }}\n", name)
        data = o.read_bytes()
        assert data.count(b"\0limit\0") == 1
        o.write_bytes(data.replace(b"\0limit\0", b"\0li\nit\0"))
        objs.append(o)
    r = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(objs[0]), str(objs[1]), "-o",
                        str(tmp_path / "lp.o"), "--symtab", str(objs[0])], capture_output=True, text=True, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "li\\nit" in lines[0], lines[0]


def test_diff_validates_its_own_output_before_writing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    # the last line of defence: a malformed live patch (here: a gcc object with a RELA section linked to
    # section 0) is not renamed over -o
    from klpforge.commands.diff import _check_own_output
    from klpforge.util.errors import InputError

    a, _ = pair
    bad = tmp_path / ".lp.o.tmp"
    bad.write_bytes(a.read_bytes())
    e = ElfFile.open(a)
    _put(bad, *_shdr_field(e, _rela_text(e), "link"), 0)
    with pytest.raises(InputError, match=r"lp.o: the live patch made from these inputs is malformed \(corrupt: "
                                         r"relocation section \[\d+\] links to section 0"):
        _check_own_output(bad, tmp_path / "lp.o")
    _check_own_output(a, tmp_path / "lp.o")  # a well-formed object passes
