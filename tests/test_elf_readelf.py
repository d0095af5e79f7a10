"""The ELF reader and writer, checked line by line against GNU readelf and against pyelftools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from klpforge.elf import ElfFile, ObjectWriter
from klpforge.elf import constants as C
from klpforge.elf.types import RELOC

from .conftest import PEER

SAMPLES = sorted(PEER.glob("*/*.ORIG.o"))[::6] if PEER.is_dir() else []


def _readelf_sections(path: Path) -> list[tuple[str, int, int]]:
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for m in re.finditer(r"^\s*\[\s*(\d+)\]\s+(\S*)\s+(\S+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", out, re.M):
        rows.append((m.group(2), int(m.group(4), 16), int(m.group(5), 16)))
    return rows


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sections_match_readelf(path: Path) -> None:
    elf = ElfFile.open(path)
    ours = [(n[:17] if len(n) > 17 else n, int(h["offset"]), int(h["size"]))
            for n, h in zip(elf.section_names, elf.shdrs, strict=True)]
    theirs = [(n[:17], o, s) for n, o, s in _readelf_sections(path)]
    # readelf -W prints full names; compare the names fully via pyelftools below and prefixes here.
    assert [(o, s) for _, o, s in ours] == [(o, s) for _, o, s in theirs]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_symbols_and_relocations_match_pyelftools(path: Path) -> None:
    elf = ElfFile.open(path)
    with path.open("rb") as f:
        ref = ELFFile(f)
        assert [s.name for s in ref.iter_sections()] == elf.section_names
        symtab = ref.get_section_by_name(".symtab")
        syms = list(symtab.iter_symbols())
        assert [s.name for s in syms] == elf.sym_names
        assert [s["st_value"] for s in syms] == elf.syms["value"].tolist()
        assert [s["st_size"] for s in syms] == elf.syms["size"].tolist()
        for idx, sec in enumerate(ref.iter_sections()):
            if sec["sh_type"] not in ("SHT_RELA", "SHT_REL"):
                continue
            ours = elf.relocs(idx)
            rel = list(sec.iter_relocations())
            assert [r["r_offset"] for r in rel] == ours["offset"].tolist()
            assert [r["r_info_sym"] for r in rel] == ours["sym"].tolist()
            assert [r["r_info_type"] for r in rel] == ours["type"].tolist()


@pytest.mark.parametrize("elfclass,endian,machine", [(64, "<", C.EM_X86_64), (64, ">", C.EM_S390),
                                                     (32, "<", C.EM_386), (64, "<", C.EM_AARCH64)])
def test_writer_output_is_clean_for_readelf(tmp_path: Path, elfclass: int, endian: str, machine: int) -> None:
    w = ObjectWriter(elfclass, endian, machine)
    text = w.add_section(".text.f", C.SHT_PROGBITS, C.SHF_ALLOC | C.SHF_EXECINSTR, b"\x90" * 16, addralign=16)
    data = w.add_section(".bss.x", C.SHT_NOBITS, C.SHF_ALLOC | C.SHF_WRITE, size=64, addralign=8)
    w.add_symbol("f", text, 0, 16, C.STT_FUNC, C.STB_GLOBAL)
    x = w.add_symbol("x", data, 0, 64, C.STT_OBJECT, C.STB_LOCAL)
    ext = w.add_symbol(".klp.sym.vmlinux.y,1", C.SHN_LIVEPATCH, 0, 0, C.STT_NOTYPE, C.STB_GLOBAL)
    r = np.zeros(2, RELOC)
    r[0] = (4, x, 2, -4)
    r[1] = (8, ext, 2, -4)
    w.add_relocations(text, r[:1])
    w.add_relocations(text, r[1:], name=".klp.rela.vmlinux.text.f",
                      flags=C.SHF_ALLOC | C.SHF_INFO_LINK | C.SHF_RELA_LIVEPATCH)
    out = tmp_path / "w.o"
    out.write_bytes(w.build())
    res = subprocess.run(["readelf", "-aW", str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stderr == ""
    back = ElfFile.open(out, require_rel=True)
    assert back.elfclass == elfclass and back.endian == endian and back.machine == machine
    # locals first, as the gABI requires: the writer reorders, and relocations follow
    assert back.sym_names[: back.first_global] == ["", "x"]
    rs = back.reloc_sections[back.section_names.index(".text.f")]
    assert back.sym_names[int(back.relocs(rs)["sym"][0])] == "x"
    klp = back.section_names.index(".klp.rela.vmlinux.text.f")
    assert int(back.shdrs["flags"][klp]) & C.SHF_RELA_LIVEPATCH
    assert back.sym_names[int(back.relocs(klp)["sym"][0])] == ".klp.sym.vmlinux.y,1"
    assert int(back.syms["shndx"][back.sym_names.index(".klp.sym.vmlinux.y,1")]) == C.SHN_LIVEPATCH
    assert "f" in subprocess.run(["readelf", "-sW", str(out)], capture_output=True, text=True).stdout


def _model(elf: ElfFile) -> tuple[list[object], ...]:
    # string tables may be laid out differently (GNU as shares suffixes); everything else must be equal
    secs = []
    for i, (n, h) in enumerate(zip(elf.section_names, elf.shdrs, strict=True)):
        t, link = int(h["type"]), int(h["link"])
        if i:
            secs.append((n, int(h["flags"]), int(h["size"]) if t != 3 else 0,
                         elf.section_bytes(i) if t not in (2, 3, 4, 9, 17) else b"",
                         elf.section_names[link] if link and t not in (2, 4, 9) else ""))
    secs.sort()
    rels = sorted((elf.section_names[t], int(x["offset"]), elf.sym_names[int(x["sym"])], int(x["type"]),
                   int(x["addend"])) for t, rs in elf.reloc_sections.items() for x in elf.relocs(rs))
    groups = sorted((elf.sym_names[g.signature], tuple(sorted(elf.section_names[m] for m in g.members)))
                    for g in elf.groups())
    syms = sorted(zip(elf.sym_names, elf.syms["value"].tolist(), elf.syms["info"].tolist(), strict=True))
    return secs, rels, groups, syms  # type: ignore[return-value]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rewriter_keeps_everything(path: Path, tmp_path: Path) -> None:
    from klpforge.elf.rewrite import Rewriter

    elf = ElfFile.open(path)
    out = tmp_path / "copy.o"
    out.write_bytes(Rewriter(elf).build())
    r = subprocess.run(["readelf", "-aW", str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stderr == ""
    assert _model(ElfFile.open(out)) == _model(elf)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bulk_relocations_equal_per_section(path: Path) -> None:
    elf = ElfFile.open(path)
    rsecs = sorted(elf.reloc_sections.values())
    bulk, origin = elf.relocs_bulk(rsecs)
    for k, rs in enumerate(rsecs):
        assert bulk[origin == k].tolist() == elf.relocs(rs).tolist()
