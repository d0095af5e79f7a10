"""``klpforge convert`` on a hand-written live patch built with Kbuild against the 6.1 test kernel.

The module (tests/source_modules/livepatch-static, in the style of samples/livepatch/livepatch-sample.c)
calls version_proc_show(), a static function of fs/proc/version.c, reads saved_command_line, a global of
init/main.c that is not exported, and refers to the second of seven static type_show() functions. Kbuild
links it with those symbols undefined (KBUILD_MODPOST_WARN=1); convert makes them klp relocations; QEMU
proves the kernel resolves them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.elf import ElfFile
from klpforge.elf import constants as C
from klpforge.kbuild.prepare import KernelLayout

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
MODULE = Path(__file__).parent / "source_modules" / "livepatch-static"
CHECK = "cat /proc/cmdline; dmesg | grep klpforge-convert:"


def klpforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True, timeout=600)


def _kbuild(kernel: KernelLayout, d: Path, cflags: str = "") -> Path:
    shutil.copytree(MODULE, d)
    r = subprocess.run(["make", "-C", str(kernel.build), f"M={d}", "-j2", "KBUILD_MODPOST_WARN=1",
                        f"KLPFORGE_DATA={ROOT / 'klpforge' / 'data'}", f"KLPFORGE_CFLAGS={cflags}", "modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # the premise: Kbuild leaves the three non-exported references undefined
    assert 'WARNING: modpost: "version_proc_show"' in r.stderr
    return d / "livepatch-static.ko"


@pytest.fixture(scope="module")
def modules(kernel: KernelLayout, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(module with KLP_SYMPOS, module without it)."""
    t = tmp_path_factory.mktemp("convert")
    return _kbuild(kernel, t / "marked"), _kbuild(kernel, t / "plain", "-DKLPFORGE_NO_SYMPOS")


def _klp(ko: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(.klp.rela section names, klp symbol names with SHN_LIVEPATCH) of a module; undefined names too."""
    elf = ElfFile.open(ko)
    secs = {n for i, n in enumerate(elf.section_names)
            if n.startswith(".klp.rela.") and int(elf.shdrs["flags"][i]) & C.SHF_RELA_LIVEPATCH}
    shndx = elf.syms["shndx"]
    return secs, {"klp": {n for i, n in enumerate(elf.sym_names) if int(shndx[i]) == C.SHN_LIVEPATCH},
                  "und": {n for i, n in enumerate(elf.sym_names) if n and int(shndx[i]) == C.SHN_UNDEF}}


def _type_show_addresses(kernel: KernelLayout) -> list[int]:
    nm = subprocess.run(["nm", str(kernel.build / "vmlinux")], capture_output=True, text=True, check=True).stdout
    return sorted(int(a, 16) for a, _t, n in (ln.split() for ln in nm.splitlines() if len(ln.split()) == 3)
                  if n == "type_show")


def test_convert_then_verify(kernel: KernelLayout, modules: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "conv.ko"
    r = klpforge("convert", str(modules[0]), "--symbols", str(kernel.build / "vmlinux"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    want = {".klp.sym.vmlinux.version_proc_show,0", ".klp.sym.vmlinux.saved_command_line,0",
            ".klp.sym.vmlinux.type_show,2"}
    assert set(r.stdout.split()) == want
    secs, syms = _klp(out)
    assert syms["klp"] == want
    assert {"version_proc_show", "saved_command_line", "type_show"}.isdisjoint(syms["und"])
    assert {"klp_enable_patch", "seq_printf"} <= syms["und"]  # exported: left to the module loader
    assert ".klp.rela.vmlinux.text" in secs
    assert ElfFile.open(out).find_section(".klpforge.sympos") is None
    assert len(_type_show_addresses(kernel)) > 2  # the premise of the KLP_SYMPOS marker
    v = klpforge("verify", str(out), "--kernel", str(kernel.bzimage), "--check", CHECK,
                 "--expect", "klpforge-convert: console=ttyS0", "--timeout", "240")
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Linux version 6.1" in v.stdout + v.stderr  # version_proc_show() ran through the klp relocation
    assert "klpforge-convert: type_show+0x0" in v.stdout + v.stderr


def test_unconverted_module_does_not_load(kernel: KernelLayout, modules: tuple[Path, Path]) -> None:
    """Why convert exists: the module as Kbuild linked it is refused by the loader."""
    v = klpforge("verify", str(modules[0]), "--kernel", str(kernel.bzimage), "--check", "true", "--timeout", "240")
    assert v.returncode == 1
    assert "insmod" in v.stdout + v.stderr


@pytest.mark.parametrize("form", ["nm", "readelf"])
def test_kallsyms_and_readelf_text_give_the_same_symbols(kernel: KernelLayout, modules: tuple[Path, Path],
                                                         tmp_path: Path, form: str) -> None:
    """``nm`` prints /proc/kallsyms' format (address, type letter, name)."""
    cmd = ["nm", "-n"] if form == "nm" else ["readelf", "-s", "--wide"]
    text = subprocess.run([*cmd, str(kernel.build / "vmlinux")], capture_output=True, text=True, check=True).stdout
    (tmp_path / "syms.txt").write_text(text)
    r = klpforge("convert", str(modules[0]), "--symbols", str(tmp_path / "syms.txt"), "-o", str(tmp_path / "c.ko"))
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {".klp.sym.vmlinux.version_proc_show,0", ".klp.sym.vmlinux.saved_command_line,0",
                                     ".klp.sym.vmlinux.type_show,2"}


def test_ambiguous_name_refused_naming_candidates(kernel: KernelLayout, modules: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "c.ko"
    vml = str(kernel.build / "vmlinux")
    n = len(_type_show_addresses(kernel))
    r = klpforge("convert", str(modules[1]), "--symbols", vml, "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert f"type_show names {n} symbols of vmlinux" in r.stderr
    assert "type_show,1 (" in r.stderr and f"type_show,{n} (" in r.stderr
    assert "KLP_SYMPOS(vmlinux, type_show, POS)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = klpforge("convert", str(modules[1]), "--symbols", vml, "--sympos", f"vmlinux:type_show,{n + 1}", "-o", str(out))
    assert r.returncode == 1 and f"position {n + 1} of type_show" in r.stderr and not out.exists()
    r = klpforge("convert", str(modules[1]), "--symbols", vml, "--sympos", "type_show,3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert ".klp.sym.vmlinux.type_show,3" in r.stdout.split()


def test_not_a_livepatch_module_refused(kernel: KernelLayout, tmp_path: Path) -> None:
    ko = kernel.build / "samples/kobject/kobject-example.ko"
    out = tmp_path / "c.ko"
    r = klpforge("convert", str(ko), "--symbols", str(kernel.build / "vmlinux"), "-o", str(out))
    assert r.returncode == 1
    assert "not a livepatch module" in r.stderr and not out.exists()
