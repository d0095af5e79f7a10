"""Objects with more than 65,280 sections (vmlinux.o with -ffunction-sections): extended numbering."""

from __future__ import annotations

import subprocess
from pathlib import Path

from klpforge.diff import DiffOptions, run_diff
from klpforge.elf import ElfFile

N = 33000  # two sections each: 66,000 + the rest, past SHN_LORESERVE (0xff00)


def _asm(path: Path, last: int) -> Path:
    out = ['.file "big.c"']
    for i in range(N):
        imm = last if i == N - 1 else 1
        out.append(f'.section .text.f{i},"ax",@progbits\n.globl f{i}\n.type f{i},@function\nf{i}:\n'
                   f" call __fentry__\n movl ${imm},%eax\n ret\n.size f{i},.-f{i}")
        out.append(f'.section .rodata.s{i},"a",@progbits\ns{i}: .long {i}')
    path.write_text("\n".join(out) + "\n")
    obj = path.with_suffix(".o")
    subprocess.run(["as", str(path), "-o", str(obj)], check=True)
    return obj


def test_diff_across_extended_section_numbers(tmp_path: Path) -> None:
    a, b = _asm(tmp_path / "a.s", 1), _asm(tmp_path / "b.s", 2)
    elf = ElfFile.open(a)
    assert elf.shnum > 0xFF00
    i = elf.sym_names.index(f"f{N - 1}")
    assert elf.section_names[int(elf.syms["shndx"][i])] == f".text.f{N - 1}"
    assert not elf.sym_special[i]
    res = run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))
    assert res.included_functions == [f"f{N - 1}"]


def test_symbol_at_many_symbols_agrees_with_linear_rule(tmp_path: Path) -> None:
    """A .text with many functions (no -ffunction-sections) uses a binary search; it must give the same
    answers as the linear rule, ties included."""
    from klpforge.diff.model import Object

    lines = [".text"]
    for i in range(200):
        lines.append(f".globl g{i}\n.type g{i},@function\ng{i}:\n .byte {', '.join(['0x90'] * (i % 7 + 1))}\n"
                     f".size g{i},.-g{i}")
        if i % 50 == 0:  # an alias at the same address
            lines.append(f".set a{i}, g{i}\n.type a{i},@function\n.size a{i},{i % 7 + 1}")
    src = tmp_path / "many.s"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["as", str(src), "-o", str(tmp_path / "many.o")], check=True)
    obj = Object.load(tmp_path / "many.o")
    sec = obj.find_section(".text")
    assert sec is not None
    members = obj.syms_in_section[sec]
    assert len(members) > 16
    size = int(obj.shdrs["size"][sec])

    assert all(obj.symbol_at(sec, off) == obj.symbol_at_linear(members, off) for off in range(-1, size + 2))
