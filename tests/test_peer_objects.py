"""klpforge diff on kpatch's unit-test object pairs, checked against what kpatch did (manifest.json).

kpatch is a reference, not the truth: deliberate differences live in expectations/peer-differences.json.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.elf import ElfFile
from klpforge.elf import constants as C
from klpforge.util.errors import KlpError

from .conftest import PEER, peer_cases

DIFFERENCES = json.loads((Path(__file__).parent / "expectations" / "peer-differences.json").read_text())
ARCHES = ["x86_64", "ppc64le", "s390x", "aarch64", "loongarch64"]


def _cases() -> list:
    return [pytest.param(c, id=f"{c['arch']}/{c['case']}") for a in ARCHES for c in peer_cases(a)]


@pytest.mark.skipif(not (PEER / "manifest.json").is_file(), reason="../shared/peer-objs not present")
@pytest.mark.parametrize("case", _cases())
def test_peer_case(case: dict, tmp_path: Path) -> None:
    key = f"{case['arch']}/{case['case']}"
    diff = DIFFERENCES.get(key, {})
    out = tmp_path / "out.o"
    opts = DiffOptions(target="vmlinux", symtab=PEER / case["orig"], env=case["env"])
    expect_refuse = case["expect"] == "refuse" or "refuse" in diff
    if expect_refuse:
        with pytest.raises(KlpError) as ei:
            run_diff(PEER / case["orig"], PEER / case["patched"], out, opts)
        assert not out.exists(), "nothing may be written when refusing"
        msg = str(ei.value)
        if "refuse" in diff:
            assert diff["refuse"] in msg
        elif case["kpatch"]["exit"] == 3:
            assert ei.value.exit_code == 3 and "no change" in msg
        else:
            assert ei.value.exit_code == 2 and (".init.text" in msg or "changed" in msg)
        return
    res = run_diff(PEER / case["orig"], PEER / case["patched"], out, opts)
    want = sorted(diff.get("functions", case["kpatch"]["output_functions"]))
    assert res.included_functions == want
    _check_output(out)


def _check_output(out: Path) -> None:
    r = subprocess.run(["readelf", "-aW", str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    elf = ElfFile.open(out, require_rel=True)
    for i, name in enumerate(elf.section_names):
        if name.startswith(".klp.rela."):
            h = elf.shdrs[i]
            assert int(h["flags"]) & C.SHF_RELA_LIVEPATCH and int(h["flags"]) & C.SHF_ALLOC
            assert int(h["type"]) == C.SHT_RELA and int(h["link"]) == elf.symtab_index
            obj = name[len(".klp.rela."):].split(".", 1)[0]
            assert obj == "vmlinux"
            for rel in elf.relocs(i):
                sym = elf.sym_names[int(rel["sym"])]
                assert sym.startswith(f".klp.sym.{obj}.") and "," in sym
                assert int(elf.syms["shndx"][int(rel["sym"])]) == C.SHN_LIVEPATCH
    # Every relocation resolvable: against a defined symbol, an undefined global the module loader
    # resolves, a klp symbol, or no symbol at all (ppc64 R_PPC64_ENTRY).
    bind = elf.syms["info"] >> 4
    for i in range(len(elf.shdrs)):
        if int(elf.shdrs[i]["type"]) not in (C.SHT_RELA, C.SHT_REL):
            continue
        for rel in elf.relocs(i):
            s = int(rel["sym"])
            if s and int(elf.syms["shndx"][s]) == C.SHN_UNDEF:
                assert int(bind[s]) != C.STB_LOCAL, f"{elf.section_names[i]}: local undefined {elf.sym_names[s]}"
                assert elf.sym_names[s], f"{elf.section_names[i]}: relocation against an unnamed undefined symbol"
    for i, name in enumerate(elf.sym_names):
        if name.startswith(".klp.sym."):
            assert int(elf.syms["shndx"][i]) == C.SHN_LIVEPATCH
            assert name.rsplit(",", 1)[1].isdigit()
