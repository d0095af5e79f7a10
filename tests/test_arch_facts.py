"""Per-architecture facts in klpforge/diff/arch.py, checked against capstone and against what real compilers
emitted in kpatch's peer objects (ppc64le, s390x, aarch64, loongarch64 next to x86_64).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.arch import ARCHES, arch_for
from klpforge.diff.disasm import instructions, mnemonic_at
from klpforge.diff.lineargs import ARG_REGS, decode
from klpforge.diff.model import Object
from klpforge.diff.names import is_local_label
from klpforge.elf import ElfFile, ObjectWriter
from klpforge.elf import constants as C
from klpforge.util.errors import InputError, UnsafeChange

from .conftest import PEER, peer_cases

needs_peers = pytest.mark.skipif(not (PEER / "manifest.json").is_file(), reason="../shared/peer-objs not present")

#: Per arch: machine code loading a small immediate into each __LINE__ argument register.
LINE_LOADS = {
    "x86_64": [bytes.fromhex("be2a000000"), bytes.fromhex("ba07000000")],  # mov esi, 42; mov edx, 7
    "ppc64le": [struct.pack("<I", 0x3880002A), struct.pack("<I", 0x38A00007)],  # li r4,42; li r5,7
    "s390x": [bytes.fromhex("a738002a"), bytes.fromhex("a7490007")],  # lhi %r3,42; lghi %r4,7
    "aarch64": [struct.pack("<I", 0x52800541), struct.pack("<I", 0x528000E2)],  # mov w1,#42; mov w2,#7
}


def _case(arch: str, name: str) -> dict:
    return next(c for c in peer_cases(arch) if c["case"] == name)


def _diff(case: dict, out: Path | None, patched: Path | None = None):  # type: ignore[no-untyped-def]
    return run_diff(PEER / case["orig"], patched or PEER / case["patched"], out,
                    DiffOptions(symtab=PEER / case["orig"], env=case["env"]))


@pytest.mark.parametrize("name", sorted(LINE_LOADS))
def test_line_registers_are_spelled_as_capstone_prints_them(name: str) -> None:
    arch = next(a for a in ARCHES.values() if a.name == name)
    for code, reg in zip(LINE_LOADS[name], ARG_REGS[name][1:3], strict=True):
        [(size, mn, ops)] = instructions(arch, code)
        assert size == len(code)
        assert mn in arch.line_mnemonics, (mn, ops)
        [ins] = decode(arch, code)
        assert ins.imm_to == reg and ins.touched == {reg} and not ins.barrier, (ops, ins)


def test_loongarch_has_no_capstone_decoder_so_line_detection_is_off() -> None:
    # capstone 5 has no LoongArch: a moved __LINE__ counts as a change there (safe, not minimal).
    assert arch_for(C.EM_LOONGARCH).cs_arch == ""
    assert arch_for(C.EM_LOONGARCH).insn_width == 4


def test_ppc64le_tail_call_is_told_from_a_call() -> None:
    ppc = arch_for(C.EM_PPC64)
    assert mnemonic_at(ppc, struct.pack("<I", 0x48000000), 0) in ppc.tail_mnemonics  # b .
    assert mnemonic_at(ppc, struct.pack("<I", 0x48000001), 0) not in ppc.tail_mnemonics  # bl .
    assert mnemonic_at(ppc, struct.pack("<I", 0x60000000), 0) == "nop"


def test_mapping_symbols_are_labels() -> None:
    assert is_local_label("$x") and is_local_label("$d") and is_local_label("$x.7")
    assert not is_local_label("$foo") and not is_local_label("x")


@needs_peers
@pytest.mark.parametrize(("arch", "types"), [("s390x", (19, 20, 26)), ("x86_64", (4,))])
def test_pcrel_bias_matches_compiler_output(arch: str, types: tuple[int, ...]) -> None:
    """Calls and PC-relative loads against a named symbol mean the symbol itself: the addend + bias is 0
    (s390x ``brasl %r14,f`` stores f+2, x86_64 ``call f`` stores f-4)."""
    a = next(x for x in ARCHES.values() if x.name == arch)
    seen = 0
    for case in peer_cases(arch)[:6]:
        obj = Object.load(PEER / case["patched"])
        for sec in obj.elf.reloc_sections:
            r = obj.relocs(sec)
            r = r[np.isin(r["type"], types)]
            named = obj.stype[r["sym"].astype(np.int64)] == C.STT_FUNC
            for t, add in zip(r["type"][named].tolist(), r["addend"][named].tolist(), strict=True):
                assert add + a.pcrel_bias[t] == 0
                seen += 1
    assert seen > 100


@needs_peers
def test_pair_of_different_architectures_is_refused() -> None:
    x86, arm = _case("x86_64", "new-function"), _case("aarch64", "new-function")
    with pytest.raises(InputError, match="differ in architecture") as ei:
        run_diff(PEER / x86["orig"], PEER / arm["patched"], None, DiffOptions(symtab=PEER / x86["orig"]))
    assert ei.value.exit_code == 1
    s390, ppc = _case("s390x", "data-new"), _case("ppc64le", "data-new")
    with pytest.raises(InputError, match="differ in architecture"):
        run_diff(PEER / s390["orig"], PEER / ppc["patched"], None, DiffOptions(symtab=PEER / s390["orig"]))


def test_pair_differing_in_byte_order_is_refused(tmp_path: Path) -> None:
    paths = []
    for endian in ("<", ">"):
        w = ObjectWriter(64, endian, C.EM_S390)
        text = w.add_section(".text.f", C.SHT_PROGBITS, C.SHF_ALLOC | C.SHF_EXECINSTR, b"\x07\xfe", addralign=4)
        w.add_symbol("f", text, 0, 2, C.STT_FUNC, C.STB_GLOBAL)
        p = tmp_path / f"{'le' if endian == '<' else 'be'}.o"
        p.write_bytes(w.build())
        paths.append(p)
    with pytest.raises(InputError, match="byte order"):
        run_diff(paths[0], paths[1], None, DiffOptions(symtab=paths[0]))


@needs_peers
def test_ppc64le_toc_slots_and_loader_symbols(tmp_path: Path) -> None:
    case = _case("ppc64le", "meminfo-string")
    out = tmp_path / "out.o"
    res = _diff(case, out)
    assert res.included_functions == ["meminfo_proc_show"]
    elf = ElfFile.open(out)
    und = {elf.sym_names[i] for i in range(1, len(elf.syms)) if int(elf.syms["shndx"][i]) == C.SHN_UNDEF}
    assert {".TOC.", "_mcount"} <= und  # resolved by the ppc64 module loader by name, never klp symbols
    assert not any(".TOC." in n or "_mcount" in n for n in elf.sym_names if n.startswith(".klp.sym."))
    # The .toc keeps relocations only for the slots the included code uses.
    text = elf.section_names.index(".text.meminfo_proc_show")
    toc = elf.section_names.index(".toc")
    used, slots = set(), set()
    for i, h in enumerate(elf.shdrs):
        if int(h["type"]) != C.SHT_RELA:
            continue
        for rel in elf.relocs(i):
            tgt = int(h["info"])
            sym = int(rel["sym"])
            if tgt == text and int(elf.syms["shndx"][sym]) == toc:
                used.add(int(rel["addend"]))
            elif tgt == toc:
                slots.add(int(rel["offset"]))
    assert used and slots == used
    orig = ElfFile.open(PEER / case["patched"])
    assert len(slots) < len(orig.relocs(orig.reloc_sections[orig.section_names.index(".toc")]))
    # The klp_func alias keeps the local entry point (st_other), which direct calls land on.
    alias = elf.sym_names.index(res.patched_functions[0].new_symbol)
    fn = orig.sym_names.index("meminfo_proc_show")
    assert int(elf.syms["other"][alias]) == int(orig.syms["other"][fn]) != 0


def _patched_copy(case: dict, tmp_path: Path, func: str, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the case's patched object with one call instruction of ``func`` rewritten by ``edit``."""
    src = PEER / case["patched"]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    obj = Object.load(src)
    f = obj.sym_names.index(func)
    sec = int(obj.shndx[f])
    r = obj.relocs(sec)
    ext = [int(x["offset"]) for x in r if int(x["type"]) == 10 and not obj.defined[int(x["sym"])]
           and obj.sym_names[int(x["sym"])] != "_mcount"]
    off = int(obj.shdrs["offset"][sec]) + ext[0]
    blob = bytearray(dst.read_bytes())
    edit(blob, off)
    dst.write_bytes(bytes(blob))
    return dst


@needs_peers
def test_ppc64le_sibling_call_out_of_the_patch_is_refused(tmp_path: Path) -> None:
    case = _case("ppc64le", "meminfo-string")

    def to_tail_call(blob: bytearray, off: int) -> None:
        insn = struct.unpack_from("<I", blob, off)[0]
        struct.pack_into("<I", blob, off, insn & ~1)  # bl -> b

    with pytest.raises(UnsafeChange, match="sibling call at meminfo_proc_show"):
        _diff(case, None, _patched_copy(case, tmp_path, "meminfo_proc_show", to_tail_call))


@needs_peers
def test_ppc64le_call_without_toc_restore_slot_is_refused(tmp_path: Path) -> None:
    case = _case("ppc64le", "meminfo-string")

    def drop_nop(blob: bytearray, off: int) -> None:
        struct.pack_into("<I", blob, off + 4, 0x7C631B78)  # mr r3,r3 where the nop was

    with pytest.raises(UnsafeChange, match="no nop after it"):
        _diff(case, None, _patched_copy(case, tmp_path, "meminfo_proc_show", drop_nop))


@needs_peers
@pytest.mark.parametrize("arch", ["aarch64", "loongarch64"])
def test_patchable_function_entries_one_per_function(arch: str, tmp_path: Path) -> None:
    """Each included function gets its own __patchable_function_entries, SHF_LINK_ORDER-tied to its code
    (GNU ld refuses to mix ordered and unordered sections of one name in the module link)."""
    case = _case(arch, "new-function")
    out = tmp_path / "out.o"
    res = _diff(case, out)
    elf = ElfFile.open(out)
    pfe = [i for i, n in enumerate(elf.section_names) if n == "__patchable_function_entries"]
    assert len(pfe) == len(res.included_functions) == 2
    linked = set()
    for i in pfe:
        h = elf.shdrs[i]
        assert int(h["flags"]) & 0x80  # SHF_LINK_ORDER
        linked.add(elf.section_names[int(h["link"])])
    assert linked == {f".text.{f}" for f in res.included_functions}


@needs_peers
def test_s390x_expoline_tables_cut_to_included_code(tmp_path: Path) -> None:
    case = _case("s390x", "data-read-mostly")
    out = tmp_path / "out.o"
    res = _diff(case, out)
    kept = res.report["special_sections"]
    assert 0 < kept[".s390_indirect_call"]["kept"] < kept[".s390_indirect_call"]["total"]
    elf = ElfFile.open(out)
    for i, n in enumerate(elf.section_names):
        if n.startswith(".rela.s390_"):
            for rel in elf.relocs(i):
                tsec = int(elf.syms["shndx"][int(rel["sym"])])
                assert elf.section_names[tsec].startswith(".text."), n
