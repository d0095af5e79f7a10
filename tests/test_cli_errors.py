"""Bad input: one clear line on stderr, the documented exit code, no traceback, no output file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.elf import ObjectWriter
from klpforge.elf import constants as C


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True, check=False)


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and needle in lines[0], lines[0]


@pytest.fixture
def good(cc) -> Path:
    return cc("int f(int x) { return x + 1; }\n", "good")


def diff(a: Path, b: Path, out: Path, symtab: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run("diff", str(a), str(b), "-o", str(out), "--symtab", str(symtab or a))


def test_missing_file(good: Path, tmp_path: Path) -> None:
    r = diff(tmp_path / "nope.o", good, tmp_path / "out.o", good)
    assert_one_line_error(r, 1, "nope.o: no such file")
    assert not (tmp_path / "out.o").exists()


def test_truncated_object(good: Path, tmp_path: Path) -> None:
    t = tmp_path / "trunc.o"
    t.write_bytes(good.read_bytes()[:200])
    r = diff(t, good, tmp_path / "out.o")
    assert_one_line_error(r, 1, "truncated")
    assert not (tmp_path / "out.o").exists()


def test_corrupt_section_headers(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    data[0x3A:0x3C] = (13).to_bytes(2, "little")  # e_shentsize
    t = tmp_path / "corrupt.o"
    t.write_bytes(bytes(data))
    assert_one_line_error(diff(t, good, tmp_path / "out.o"), 1, "corrupt ELF header")


def test_not_elf(good: Path, tmp_path: Path) -> None:
    t = tmp_path / "text.o"
    t.write_text("hello\n")
    assert_one_line_error(diff(t, good, tmp_path / "out.o"), 1, "not an ELF file")


def test_executable_is_not_relocatable(gcc: str, good: Path, tmp_path: Path) -> None:
    src = tmp_path / "m.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "m"
    subprocess.run([gcc, str(src), "-o", str(exe)], check=True)
    assert_one_line_error(diff(exe, good, tmp_path / "out.o"), 1, "not a relocatable object")


def test_wrong_class_pair(good: Path, tmp_path: Path) -> None:
    w = ObjectWriter(32, "<", C.EM_386)
    t = w.add_section(".text.f", C.SHT_PROGBITS, C.SHF_ALLOC | C.SHF_EXECINSTR, b"\xc3")
    w.add_symbol("f", t, 0, 1, C.STT_FUNC, C.STB_GLOBAL)
    o32 = tmp_path / "f32.o"
    o32.write_bytes(w.build())
    assert_one_line_error(diff(o32, good, tmp_path / "out.o"), 1, "differ in architecture")


def test_bad_symtab_text(cc, good: Path, tmp_path: Path) -> None:
    b = cc("int f(int x) { return x + 2; }\n", "b")
    st = tmp_path / "symtab.txt"
    st.write_text("this is not readelf output\n")
    r = diff(good, b, tmp_path / "out.o", st)
    assert_one_line_error(r, 1, "symtab.txt:1: not a line of `readelf -s --wide` output")
    assert not (tmp_path / "out.o").exists()


def test_refusal_exit_2_names_symbol(cc, tmp_path: Path) -> None:
    a = cc("int limit = 1;\nint g(void) { return limit; }\n", "a")
    b = cc("int limit = 2;\nint g(void) { return limit; }\n", "b")
    r = diff(a, b, tmp_path / "out.o")
    assert r.returncode == 2 and "data limit" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.o").exists()


def test_success_writes_output_and_json(cc, tmp_path: Path) -> None:
    a = cc("int f(int x) { return x + 1; }\n", "a")
    b = cc("int f(int x) { return x + 3; }\n", "b")
    r = run("diff", str(a), str(b), "-o", str(tmp_path / "out.o"), "--symtab", str(a), "--json",
            str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "replaces: f" in r.stdout
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["patched_functions"][0]["old_name"] == "f"
    assert rep["patched_functions"][0]["new_symbol"] == "klpf_vmlinux__f__0"


def test_big_endian_ppc64_is_refused(tmp_path: Path) -> None:
    w = ObjectWriter(64, ">", C.EM_PPC64)
    t = w.add_section(".text.f", C.SHT_PROGBITS, C.SHF_ALLOC | C.SHF_EXECINSTR, b"\x4e\x80\x00\x20")
    w.add_symbol("f", t, 0, 4, C.STT_FUNC, C.STB_GLOBAL)
    obj = tmp_path / "be.o"
    obj.write_bytes(w.build())
    assert_one_line_error(diff(obj, obj, tmp_path / "out.o"), 1, "big-endian ppc64 (ELFv1) objects are not supported")


@pytest.mark.parametrize("args, needle", [
    (("diff", "a.o"), "the following arguments are required"),
    (("nosuchcmd",), "invalid choice: 'nosuchcmd'"),
    (("build", "--bogus", "x.patch"), "unrecognized arguments: --bogus"),
    (("impact", "--dumps"), "expected one argument"),
])
def test_usage_error_is_bad_input(args: tuple[str, ...], needle: str) -> None:
    # exit 2 means "refused as unsafe" for klpforge: a usage error must not look like one
    assert_one_line_error(run(*args), 1, needle)
