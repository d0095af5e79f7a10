"""Targets: jump labels keyed in a module are refused, sympos follows the kernel's counting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.util.errors import UnsafeChange

JUMP = """
struct static_key { int enabled; };
static struct static_key mykey;
static inline __attribute__((always_inline)) int key_on(void)
{
    asm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\\n\\t"
        ".pushsection __jump_table, \\"aw\\"\\n\\t.balign 8\\n\\t"
        ".long 1b - ., %%l[l_yes] - .\\n\\t.quad %%c0 - .\\n\\t.popsection"
        : : "i"(&mykey) : : l_yes);
    return 0;
l_yes:
    return 1;
}
void set_key(int v) { mykey.enabled = v; }
int f(int x) { return key_on() ? x : x + %d; }
int g(int x) { return key_on() ? -x : x; }
"""


def test_jump_label_keyed_in_module_is_refused(cc, tmp_path: Path) -> None:
    a, b = cc(JUMP % 2, "a"), cc(JUMP % 3, "b")
    with pytest.raises(UnsafeChange, match="function f tests jump label mykey, a static key of module mymod"):
        run_diff(a, b, tmp_path / "o.o", DiffOptions(target="mymod", symtab=a, env={"JUMP_STRUCT_SIZE": "16"}))
    assert not (tmp_path / "o.o").exists()


def test_jump_label_keyed_in_vmlinux_keeps_only_its_entry(cc, tmp_path: Path) -> None:
    a, b = cc(JUMP % 2, "a"), cc(JUMP % 3, "b")
    res = run_diff(a, b, tmp_path / "o.o", DiffOptions(target="vmlinux", symtab=a, env={"JUMP_STRUCT_SIZE": "16"}))
    assert res.included_functions == ["f"]
    assert res.report["special_sections"]["__jump_table"] == {"kept": 1, "total": 2}
    assert [(r.section, r.symbol) for r in res.klp_relocs if r.section == "__jump_table"] == [
        ("__jump_table", "mykey")]


ONE = "static __attribute__((noinline)) int helper(int x) { return x + %d; }\nint %s(int x) { return helper(x); }\n"


def test_sympos_counts_same_named_locals_of_other_files(gcc: str, tmp_path: Path) -> None:
    # vmlinux-like target: two files, each with a static helper; ours is the second one
    objs = []
    for name, k, fn in (("one", 1, "first"), ("two", 2, "second")):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}.c").write_text(ONE % (k, fn))
        subprocess.run([gcc, "-O2", "-ffunction-sections", "-pg", "-mfentry", "-c", f"{name}.c"], cwd=d, check=True)
        objs.append(d / f"{name}.o")
    target = tmp_path / "vmlinux.o"
    subprocess.run(["ld", "-r", "-o", str(target), *map(str, objs)], check=True)
    p = tmp_path / "patched"
    p.mkdir()
    (p / "two.c").write_text(ONE % (5, "second"))
    subprocess.run([gcc, "-O2", "-ffunction-sections", "-pg", "-mfentry", "-c", "two.c"], cwd=p, check=True)
    res = run_diff(objs[1], p / "two.o", tmp_path / "lp.o", DiffOptions(symtab=target, env={}))
    assert [(f.old_name, f.sympos) for f in res.patched_functions] == [("helper", 2)]
    assert res.patched_functions[0].new_symbol == "klpf_vmlinux__helper__2"
    # readelf text works the same as the ELF file
    text = subprocess.run(["readelf", "-sW", str(target)], capture_output=True, text=True, check=True).stdout
    (tmp_path / "symtab.txt").write_text(text)
    res2 = run_diff(objs[1], p / "two.o", tmp_path / "lp2.o", DiffOptions(symtab=tmp_path / "symtab.txt", env={}))
    assert [(f.old_name, f.sympos) for f in res2.patched_functions] == [("helper", 2)]


def test_callbacks_get_global_aliases(tmp_path: Path) -> None:
    from klpforge.elf import ElfFile
    from klpforge.elf import constants as C

    from .conftest import PEER

    case = PEER / "x86_64" / "clang-lstr"
    if not Path(f"{case}.ORIG.o").exists():
        pytest.skip("peer objects not present")
    res = run_diff(Path(f"{case}.ORIG.o"), Path(f"{case}.PATCHED.o"), tmp_path / "cb.o",
                   DiffOptions(symtab=Path(f"{case}.ORIG.o"), env={}))
    assert sorted(res.callbacks) == ["post_patch", "post_unpatch", "pre_patch", "pre_unpatch"]
    elf = ElfFile.open(tmp_path / "cb.o")
    for alias in res.callbacks.values():
        i = elf.sym_names.index(alias)
        assert int(elf.syms["info"][i]) >> 4 == C.STB_GLOBAL and int(elf.syms["info"][i]) & 0xF == C.STT_FUNC
