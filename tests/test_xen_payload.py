"""Xen payload emit: objects compiled by gcc in the run, a linked executable standing in for xen-syms."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from klpforge.diff.arch import arch_for
from klpforge.diff.compare import compare
from klpforge.diff.correlate import correlate
from klpforge.diff.model import Object
from klpforge.diff.select import select
from klpforge.elf import ElfFile
from klpforge.xen.emit import FUNC_SIZE, PAYLOAD_VERSION, XenEmitOptions, emit_xen
from klpforge.xen.payload import link_payload
from klpforge.xen.syms import XenSyms, read_build_id

FLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-fno-asynchronous-unwind-tables",
         "-fcf-protection=none", "-fno-pic", "-fno-inline"]

ORIG = """
int table[2] = {1, 2};
void sink(int);
static __attribute__((noinline)) int helper(int x) { return x * 3 + table[1]; }
int entry(int x) { sink(helper(x)); return x + 1; }
void tiny(void) { }
__attribute__((section(".init.text"))) int boot_only(int x) { return x + 1; }
void _start(void) { }
void sink(int x) { table[0] = x; }
"""


def _objs(gcc: str, tmp: Path, orig: str, patched: str) -> tuple[Path, Path, Path]:
    out = []
    for name, src in (("orig", orig), ("patched", patched)):
        d = tmp / name
        d.mkdir()
        (d / "unit.c").write_text(src)
        subprocess.run([gcc, *FLAGS, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        out.append(d / "unit.o")
    syms = tmp / "xen-syms"
    subprocess.run([gcc, "-nostdlib", "-static", "-Wl,--build-id=sha1", "-o", str(syms), str(out[0])], check=True)
    return out[0], out[1], syms


def _emit(a: Path, b: Path, syms: Path):
    oa, ob = Object.load(a), Object.load(b)
    arch = arch_for(oa.elf.machine)
    corr = correlate(oa, ob)
    cmp = compare(corr, arch)
    sel = select(corr, cmp, arch, require_ftrace=False)
    if sel.refusals:
        return sel.refusals, None
    part = emit_xen(corr, cmp, sel, arch, XenEmitOptions(XenSyms.load(syms)))
    return part.refusals, part


def test_payload_funcs_notes_and_names(gcc: str, tmp_path: Path) -> None:
    a, b, syms = _objs(gcc, tmp_path, ORIG, ORIG.replace("x * 3", "x * 5"))
    refusals, part = _emit(a, b, syms)
    assert refusals == [] and part is not None
    assert [f.name for f in part.funcs] == ["unit.c#helper"]  # a static, named as Xen's symbol table does
    (tmp_path / "part.o").write_bytes(part.data)
    out = tmp_path / "fix.livepatch"
    bid = read_build_id(syms)
    link_payload([tmp_path / "part.o"], out, bid, bid)
    elf = ElfFile.open(out)
    names = elf.section_names
    for sec in (".livepatch.funcs", ".livepatch.depends", ".livepatch.xen_depends", ".note.gnu.build-id"):
        assert names.count(sec) == 1, sec
    funcs = elf.section_bytes(names.index(".livepatch.funcs"))
    assert len(funcs) == FUNC_SIZE
    new_size, old_size, version = struct.unpack_from("<IIB", funcs, 24)
    xs = XenSyms.load(syms)
    assert old_size == xs.lookup("unit.c#helper").size and version == PAYLOAD_VERSION and new_size > 0
    dep = elf.section_bytes(names.index(".livepatch.xen_depends"))
    assert dep.endswith(bid) and dep[12:16] == b"GNU\0"
    assert read_build_id(out) != bid  # the payload's own id, computed by ld
    # data that stays in the hypervisor: an undefined global resolved by name at load
    undef = [n for n, s in zip(elf.sym_names, elf.syms["shndx"], strict=True) if s == 0 and n]
    assert undef == ["table"]


def test_refusals_name_symbol_and_reason(gcc: str, tmp_path: Path) -> None:
    patched = (ORIG.replace("{1, 2}", "{1, 7}").replace("void tiny(void) { }", "void tiny(void) { sink(4); }")
               .replace("return x + 1; }\nvoid tiny", "return x + 1; }\nvoid tiny")
               .replace("boot_only(int x) { return x + 1; }", "boot_only(int x) { return x + 2; }"))
    a, b, syms = _objs(gcc, tmp_path, ORIG, patched)
    refusals, _ = _emit(a, b, syms)
    text = "\n".join(refusals)
    assert "data table" in text and "changed" in text
    assert "boot_only" in text and "init" in text


def test_too_short_for_the_jump(gcc: str, tmp_path: Path) -> None:
    a, b, syms = _objs(gcc, tmp_path, ORIG, ORIG.replace("void tiny(void) { }", "void tiny(void) { sink(4); }"))
    refusals, _ = _emit(a, b, syms)
    assert any(r.startswith("tiny: only 1 bytes long, too short for the 5-byte jump") for r in refusals), refusals


def test_source_must_match_binary(gcc: str, tmp_path: Path) -> None:
    # xen-syms built from other code: the replaced function's size differs, so the source is not the binary's
    a, b, _ = _objs(gcc, tmp_path, ORIG, ORIG.replace("x * 3", "x * 5"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "unit.c").write_text(ORIG.replace("x * 3 + table[1]", "x * 3 + table[1] * x - table[0]"))
    subprocess.run([gcc, *FLAGS, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=other)
    syms = tmp_path / "other-syms"
    subprocess.run([gcc, "-nostdlib", "-static", "-Wl,--build-id=sha1", "-o", str(syms), str(other / "unit.o")],
                   check=True)
    refusals, _ = _emit(a, b, syms)
    assert any("unit.c#helper" in r and "does not match the running hypervisor" in r for r in refusals), refusals


@pytest.mark.parametrize("bad", ["not-a-version", "debian:6.1"])
def test_distro_spelling(bad: str) -> None:
    from klpforge.util.errors import InputError
    from klpforge.xen.debian import DebianXen
    with pytest.raises(InputError):
        DebianXen.parse(bad if ":" in bad else f"debian-xen:{bad}")


def _cli(*args: str):
    import os
    import sys

    from .conftest import ROOT
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)


def test_cli_bad_input_one_line(tmp_path: Path) -> None:
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/xen/common/version.c\n+++ b/xen/common/version.c\n@@ -1 +1 @@\n-a\n+b\n")
    cases = [
        (["build", "--xen", str(patch)], "--xen needs -s XEN_SRC"),
        (["build", "--xen", "-s", str(tmp_path), "--xen-syms", str(tmp_path / "x"), str(patch)],
         "not a Xen source tree"),
        (["build", "--distro", "debian-xen:nonsense", str(patch)], "is not a Debian Xen version"),
        (["verify", str(patch), "--distro", "debian-xen:nonsense", "--check", "true"], "is not a Debian Xen version"),
    ]
    for args, msg in cases:
        r = _cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
    assert not any(tmp_path.glob("*.livepatch"))


def test_other_compiler_refused(gcc: str, tmp_path: Path) -> None:
    from klpforge.util.errors import InputError
    from klpforge.xen.pipeline import _check_compiler
    a, _, syms = _objs(gcc, tmp_path, ORIG, ORIG)
    _check_compiler(XenSyms.load(syms), a)  # same gcc: fine
    (tmp_path / "c").write_bytes(b"GCC: (Other) 99.1\0")
    other = tmp_path / "other-cc.o"
    subprocess.run(["objcopy", "--remove-section", ".comment", "--add-section", f".comment={tmp_path / 'c'}",
                    str(a), str(other)], check=True)
    with pytest.raises(InputError, match=r"compiler here \('GCC: \(Other\) 99.1'\) is not the one"):
        _check_compiler(XenSyms.load(syms), other)
