"""klp relocations survive a real ``ld -r`` link through strip_klp/apply_klp, entry for entry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from klpforge.diff import DiffOptions, run_diff
from klpforge.elf import ElfFile
from klpforge.elf import constants as C
from klpforge.emit.postlink import apply_klp, strip_klp


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
