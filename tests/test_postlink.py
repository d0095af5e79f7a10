"""klp relocations survive a real ``ld -r`` link through strip_klp/apply_klp, entry for entry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.emit.postlink import apply_klp, strip_klp
from klpforge.elf import ElfFile
from klpforge.elf import constants as C


def klp_entries(path: Path) -> list[tuple[str, str, int, str, int, int]]:
    elf = ElfFile.open(path)
    out = []
    for i, n in enumerate(elf.section_names):
        if n.startswith(".klp.rela."):
            assert int(elf.shdrs["flags"][i]) & C.SHF_RELA_LIVEPATCH
            tgt = elf.section_names[int(elf.shdrs["info"][i])]
            for r in elf.relocs(i):
                s = int(r["sym"])
                assert int(elf.syms["shndx"][s]) == C.SHN_LIVEPATCH
                out.append((n, tgt, int(r["offset"]), elf.sym_names[s], int(r["type"]), int(r["addend"])))
    return sorted(out)


SRC = """
static int hidden_counter;
static __attribute__((noinline)) int hidden_helper(int x) { return x * 3 + hidden_counter; }
int entry(int x) { return hidden_helper(x) + %d; }
int other(int x) { return hidden_helper(x); }
"""


def test_klp_relocations_survive_ld_r(cc, tmp_path: Path) -> None:
    a, b = cc(SRC % 1, "a"), cc(SRC % 2, "b")
    out = tmp_path / "lp.o"
    run_diff(a, b, out, DiffOptions(symtab=a, env={}))
    before = klp_entries(out)
    assert any(".klp.sym.vmlinux.hidden_helper,0" == e[3] for e in before)
    sc = strip_klp(out, tmp_path / "link.o")
    sc = json.loads(json.dumps(sc))  # the sidecar is plain JSON
    link = ElfFile.open(tmp_path / "link.o")
    assert not any(n.startswith(".klp.") for n in link.section_names + link.sym_names)
    # a second object in the same link moves our sections to non-zero offsets
    pad = cc("int pad(int x) { return x; }\n", "pad")
    ko = tmp_path / "mod.o"
    subprocess.run(["ld", "-r", "-o", str(ko), str(pad), str(tmp_path / "link.o")], check=True)
    apply_klp(ko, sc)
    after = klp_entries(ko)
    assert [(e[0], e[3], e[4], e[5]) for e in after] == [(e[0], e[3], e[4], e[5]) for e in before]
    r = subprocess.run(["readelf", "-aW", str(ko)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""


# Two objects of one patch, each calling a static function of its own file: issue 12 item 10.
SRC_A = """
static __attribute__((noinline)) int a_helper(int x) { return x * 3; }
int a_entry(int x) { return a_helper(x) + %d; }
"""
SRC_B = """
static int b_counter;
static __attribute__((noinline)) int b_helper(int x) { return x + b_counter; }
int b_entry(int x) { return b_helper(x) * %d; }
"""


def _diffed(cc, src: str, name: str, tmp_path: Path) -> Path:
    a, b = cc(src % 1, f"{name}-orig"), cc(src % 2, f"{name}-patched")
    out = tmp_path / f"{name}.lp.o"
    run_diff(a, b, out, DiffOptions(symtab=a, env={}))
    return out


def test_klp_relocations_of_every_object_survive_one_link(cc, tmp_path: Path) -> None:
    outs = [_diffed(cc, SRC_A, "a", tmp_path), _diffed(cc, SRC_B, "b", tmp_path)]
    before = sorted(e for o in outs for e in klp_entries(o))
    assert {e[3] for e in before} >= {".klp.sym.vmlinux.a_helper,0", ".klp.sym.vmlinux.b_helper,0"}
    links = [tmp_path / f"link{i}.o" for i in range(2)]
    scs = [strip_klp(o, link) for o, link in zip(outs, links, strict=True)]
    ko = tmp_path / "mod.o"
    subprocess.run(["ld", "-r", "-o", str(ko), *map(str, links)], check=True)
    assert apply_klp(ko, scs) == []
    after = klp_entries(ko)
    assert sorted((e[0], e[3], e[4], e[5]) for e in after) == sorted((e[0], e[3], e[4], e[5]) for e in before)
    assert not any(n.startswith("__klpf_anchor_") for n in ElfFile.open(ko).sym_names)


# A new global defined by one object and called by another: issue 12 item 11.
SRC_DEF = """
int keep(int x) { return x; }
%s
"""
SRC_USE = """
int user(int x) { return x + %s; }
"""


def test_new_global_of_the_patch_binds_inside_the_module(cc, tmp_path: Path) -> None:
    d_orig = cc(SRC_DEF % "", "def-orig")
    d_new = cc(SRC_DEF % "int __attribute__((noinline)) klpf_new_helper(int x) { return x * 7; }", "def-new")
    u_orig = cc(SRC_USE % "1", "use-orig")
    u_new = cc("int klpf_new_helper(int x);\n" + SRC_USE % "klpf_new_helper(x)", "use-new")
    outs = [tmp_path / "def.lp.o", tmp_path / "use.lp.o"]
    run_diff(d_orig, d_new, outs[0], DiffOptions(symtab=d_orig, env={}))
    run_diff(u_orig, u_new, outs[1], DiffOptions(symtab=u_orig, env={}))
    # the diff of one object cannot know: the call is a klp relocation to a vmlinux symbol
    assert any(e[3] == ".klp.sym.vmlinux.klpf_new_helper,0" for e in klp_entries(outs[1]))
    from klpforge.kbuild.newsyms import patch_globals
    new = patch_globals({"def.o": d_orig, "use.o": u_orig}, {"def.o": d_new, "use.o": u_new})
    assert new == {"klpf_new_helper"}
    links = [tmp_path / f"link{i}.o" for i in range(2)]
    scs = [strip_klp(o, link) for o, link in zip(outs, links, strict=True)]
    ko = tmp_path / "mod.o"
    subprocess.run(["ld", "-r", "-o", str(ko), *map(str, links)], check=True)
    assert apply_klp(ko, scs, bind_inside=new) == ["klpf_new_helper"]
    assert not any("klpf_new_helper" in e[3] for e in klp_entries(ko))
    elf = ElfFile.open(ko)
    rela = elf.reloc_sections[elf.section_names.index(".text.user")]
    assert "klpf_new_helper" in [elf.sym_names[int(r["sym"])] for r in elf.relocs(rela)]
    # a real linker resolves the call to the module's own definition
    exe = tmp_path / "mod.exe"
    subprocess.run(["ld", "-r", "-o", str(exe), str(ko)], check=True)
    dis = subprocess.run(["objdump", "-dr", str(exe)], capture_output=True, text=True, check=True).stdout
    user = dis[dis.index("section .text.user:"):]
    assert "R_X86_64_PLT32\tklpf_new_helper-0x4" in user.split("Disassembly")[0], user
