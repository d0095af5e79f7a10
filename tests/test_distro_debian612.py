"""Debian 13's kernel (trixie, 6.12.117+deb13-amd64 = linux 6.12.117-1, built by gcc-14 14.2.0-19): live patches
from Debian's own packages, compiled in a trixie build root (mmdebstrap, the config's exact compiler), proven in
the shipped kernel under QEMU (issue 15 acceptance).

From an empty cache: klpforge's apt index (~30 s), the packages (~280 MB), the trixie build root (~2-3 min),
``make prepare modules_prepare`` in it (~3 min on 2 cores), one boot for the kallsyms capture. Skipped unless
prepared, ``KLPFORGE_REQUIRE_KERNEL=1`` (CI) or ``KLPFORGE_DISTRO=1``.

The fixes are real: two changes of Debian's 6.12.117-1 -> 6.12.118-1 update (trixie-security), one in vmlinux
and one in a module, each built as a live patch for 6.12.117 and loaded into that kernel.
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.distro.base import DistroTree

pytestmark = [pytest.mark.distro, pytest.mark.kernel]

RELEASE = "6.12.117+deb13-amd64"
DISTRO = f"debian:{RELEASE}"
PATCHES = Path(__file__).parent / "distro_patches"
KPATCHES = Path(__file__).parent / "kernel_patches"
CC = "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"


def klpforge(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def tree612() -> DistroTree:
    from klpforge.distro import debian

    root = debian.release_root(RELEASE)
    if not (root / "prepared.json").is_file() and not (os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1"
                                                       or os.environ.get("KLPFORGE_DISTRO") == "1"):
        pytest.skip(f"Debian {RELEASE} not prepared (KLPFORGE_DISTRO=1 downloads and prepares it)")
    return debian.prepare_tree(RELEASE, progress=print)


def test_prepared_in_the_release_build_root(tree612: DistroTree) -> None:
    """gcc-14 14.2.0-19 is not the host's compiler: the tree was prepared in the trixie root, whose compiler
    prints the config's exact line; the stamp records every package with the signed index's SHA-256."""
    from klpforge.distro.roots import in_root

    assert tree612.extra["root_suite"] == "trixie" and tree612.extra["cc_text"] == CC
    r = subprocess.run(in_root(tree612, ["x86_64-linux-gnu-gcc-14", "--version"]), capture_output=True,
                       text=True, check=True)
    assert r.stdout.splitlines()[0] == CC
    # entered read-only: the root cannot be written, the release's directory can
    w = subprocess.run(in_root(tree612, ["sh", "-c", "touch /usr/klpforge-x; echo rc=$?"]), capture_output=True,
                       text=True, check=False)
    assert "Read-only file system" in w.stderr and "rc=1" in w.stdout
    stamp = json.loads((tree612.build.parent / "prepared.json").read_text())
    assert stamp["cc"] == CC
    assert {d["package"] for d in stamp["debs"].values()} == {
        f"linux-image-{RELEASE}", f"linux-headers-{RELEASE}", "linux-headers-6.12.117+deb13-common",
        "linux-kbuild-6.12.117+deb13", "linux-source-6.12"}
    assert all(len(d["sha256"]) == 64 and d["version"] == "6.12.117-1" for d in stamp["debs"].values())
    # Debian 13 ships compressed modules only
    assert list((tree612.modules_dir or Path("/")).rglob("pppoe.ko.xz"))


def _verified(v: subprocess.CompletedProcess[str]) -> None:
    assert v.returncode == 0, v.stderr[-3000:]
    for step in ("boot", "insmod", "enabled", "transition", "check", "disable", "rmmod"):
        assert step in v.stderr
    logs = " ".join(Path(m).read_text(errors="replace") for m in _console_logs(v.stderr))
    # 6.12 warns once when a jmp to the return thunk was left unpatched (a site missing from .return_sites)
    assert "Unpatched return thunk" not in logs


#: the tables objtool writes per site (6.12 tools/objtool/check.c, orc_gen.c)
OBJTOOL_TABLES = (".return_sites", ".call_sites", ".retpoline_sites", ".static_call_sites", ".ibt_endbr_seal",
                  ".orc_unwind_ip")


def objtool_entries(path: Path, func: str) -> dict[str, set[tuple[int, str]]]:
    """table -> {(place relative to ``func``, ORC entry hex for .orc_unwind_ip)} for the sites in ``func``
    and its 16 bytes of padding."""
    from klpforge.elf import ElfFile

    elf = ElfFile.open(path, require_rel=True)
    i = elf.sym_names.index(func)
    sec, v, size = int(elf.syms["shndx"][i]), int(elf.syms["value"][i]), int(elf.syms["size"][i])
    orc = elf.find_section(".orc_unwind")
    orc_data = elf.section_bytes(orc) if orc is not None else b""
    out: dict[str, set[tuple[int, str]]] = {}
    for t, rs in elf.reloc_sections.items():
        name = elf.section_names[t]
        if name not in OBJTOOL_TABLES:
            continue
        r = elf.relocs(rs)
        for off, sym, add in zip(r["offset"].tolist(), r["sym"].tolist(), r["addend"].tolist(), strict=True):
            if int(elf.syms["shndx"][sym]) != sec:
                continue
            place = int(elf.syms["value"][sym]) + add - v
            if -16 <= place <= size:
                e = off // 4
                out.setdefault(name, set()).add((place, orc_data[e * 6:e * 6 + 6].hex()
                                                 if name == ".orc_unwind_ip" else ""))
    return out


def _console_logs(stderr: str) -> list[str]:
    import re

    return [m for m in re.findall(r"console log: (\S+?\.log)", stderr) if Path(m).is_file()]


def _build(patches: list[Path], out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    rep = out.with_suffix(".json")
    r = klpforge("build", "--distro", DISTRO, *map(str, patches), "-o", str(out), "--json", str(rep), *extra)
    return r, (json.loads(rep.read_text()) if rep.is_file() else {})


def test_vmlinux_fix_of_6_12_118(tree612: DistroTree, tmp_path: Path) -> None:
    """mm/vmscan.c should_abort_scan(), a real fix of 6.12.118, live-patched into 6.12.117."""
    ko = tmp_path / "livepatch-vmscan.ko"
    r, rep = _build([PATCHES / "612-00-mm-vmscan-should-abort-scan.patch"], ko)
    assert r.returncode == 0, r.stderr[-3000:]
    (obj,) = rep["objects"]
    assert obj["object"] == "mm/vmscan.o" and obj["target"] == "vmlinux"
    names = [f["old_name"] for f in obj["functions"]]
    assert names and all(v["ok"] for v in obj["source_matches_binary"]), obj["source_matches_binary"]
    # the shipped kernel's vermagic; unsigned for a Secure Boot lockdown kernel: said in one line
    info = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=False)
    assert info.stdout.startswith(f"{RELEASE} SMP preempt mod_unload modversions")
    assert (f"warning: {ko.name} is unsigned: on a machine booted with UEFI Secure Boot {RELEASE} refuses it "
            "(lockdown)") in " ".join(r.stderr.split())
    assert f"note: {RELEASE} installs its modules as .ko.xz" in " ".join(r.stderr.split())
    listing = "ls /sys/kernel/livepatch/livepatch_vmscan/vmlinux"
    v = klpforge("verify", str(ko), "--distro", DISTRO, "--check", listing,
                 "--expect", f"{names[0]},", "--timeout", "600")
    _verified(v)


def test_module_fix_of_6_12_118_as_ko_xz(tree612: DistroTree, tmp_path: Path) -> None:
    """pppoe's 6.12.118 fix (a .ko.xz module target), written as Debian installs modules (.ko.xz)."""
    import re
    import shutil

    ko = tmp_path / "livepatch-pppoe.ko.xz"
    r, rep = _build([PATCHES / "612-10-pppoe-delete-by-pointer.patch"], ko, "--keep-tmp")
    kept = re.search(r"temporary files kept in (\S+)", r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    (obj,) = rep["objects"]
    assert obj["target"] == "pppoe" and all(v["ok"] for v in obj["source_matches_binary"])
    names = {f["old_name"] for f in obj["functions"]}
    assert "pppoe_release" in names or "delete_item" in names, names
    plain = tmp_path / "livepatch-pppoe.ko"
    plain.write_bytes(lzma.decompress(ko.read_bytes()))
    assert plain.read_bytes()[:4] == b"\x7fELF"
    # Structurally what the kernel's own objtool writes for an ordinary module of the same code: pppoe.o, a
    # single-object module, went through objtool (--link --module) when Kbuild compiled it; every new function's
    # sites and ORC entries (offsets from the function, ORC bytes) are the ones objtool gave pppoe.o.
    assert kept, r.stderr[-2000:]
    tmp = Path(kept.group(1))
    try:
        for f in obj["functions"]:
            want = objtool_entries(tmp / "patched/drivers/net/ppp/pppoe.o", f["old_name"])
            got = objtool_entries(plain, f["new_symbol"])
            assert want.get(".return_sites") and want.get(".orc_unwind_ip"), want
            assert got == want, (f["old_name"], {k: (sorted(got.get(k, set()) ^ want.get(k, set()))[:4])
                                                  for k in OBJTOOL_TABLES})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the live patch's own code too: every jmp to the return thunk is a listed site (exit runs at rmmod)
    from klpforge.kbuild.module import check_sites

    check_sites(plain, {"CONFIG_MITIGATION_RETHUNK": "y", "CONFIG_MITIGATION_RETPOLINE": "y"}, tmp_path / "log")
    info = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=False)
    assert info.stdout.startswith(f"{RELEASE} SMP"), "kmod reads the .ko.xz"
    check = "grep -q '^pppoe ' /proc/modules && echo pppoe-loaded; ls /sys/kernel/livepatch/livepatch_pppoe/pppoe"
    v = klpforge("verify", str(plain), "--distro", DISTRO, "--load-modules", "pppoe", "--check", check,
                 "--expect", "pppoe-loaded", "--timeout", "600")
    _verified(v)


def test_header_static_inline_reaches_its_objects(tree612: DistroTree, tmp_path: Path) -> None:
    """A header-only patch: is_empty_pde() (fs/proc/internal.h) is found in fs/proc/inode.o and
    fs/proc/generic.o from the preprocessor dependency lists; one live patch for both."""
    ko = tmp_path / "livepatch-pde.ko"
    r, rep = _build([KPATCHES / "09-header-static-inline.patch"], ko)
    assert r.returncode == 0, r.stderr[-3000:]
    objs = {o["object"] for o in rep["objects"]}
    assert objs == {"fs/proc/inode.o", "fs/proc/generic.o"}, objs
    v = klpforge("verify", str(ko), "--distro", DISTRO, "--check",
                 "ls /proc/sys >/dev/null; cat /proc/version >/dev/null; dmesg | grep -c klpforge-pde",
                 "--timeout", "600")
    _verified(v)


def test_header_change_outside_functions_refused(tree612: DistroTree, tmp_path: Path) -> None:
    patch = tmp_path / "macro.patch"
    patch.write_text("--- a/fs/proc/internal.h\n+++ b/fs/proc/internal.h\n@@ -1,3 +1,4 @@\n"
                     + "".join(f" {ln}\n" for ln in (tree612.src / "fs/proc/internal.h").read_text().splitlines()[:1])
                     + "+#define KLPFORGE_X 1\n"
                     + "".join(f" {ln}\n" for ln in (tree612.src / "fs/proc/internal.h").read_text().splitlines()[1:3]))
    r, _ = _build([patch], tmp_path / "x.ko")
    assert r.returncode == 1
    assert ("fs/proc/internal.h: the patch changes lines outside function bodies (a macro, type or declaration)"
            in r.stderr)
    assert not (tmp_path / "x.ko").exists()


RELEASE_73 = "7.3.4+deb13-amd64"


def test_own_patch_on_7_3_backports(tmp_path: Path) -> None:
    """trixie-backports' 7.3.4+deb13-amd64 (an image metapackage; config and vmlinuz under usr/lib/modules),
    prepared in the trixie Rust root (its config has CONFIG_RUST=y: rustc 1.85.1, bindgen 0.71.1, which trixie
    ships): a patch of our own built and verified in the shipped kernel. Not in the CI budget (the Rust root is
    1.7 GB and 5-8 minutes, the prepare builds rust/ too): runs when prepared, or with KLPFORGE_DISTRO_73=1."""
    from klpforge.distro import debian
    from klpforge.kbuild.objtool import read_config

    if not (debian.release_root(RELEASE_73) / "prepared.json").is_file() and \
            os.environ.get("KLPFORGE_DISTRO_73") != "1":
        pytest.skip(f"Debian {RELEASE_73} not prepared (KLPFORGE_DISTRO_73=1 prepares it)")
    tree = debian.prepare_tree(RELEASE_73)
    assert tree.config.name == "config" and tree.extra["root_suite"] == "trixie"
    shipped = read_config(tree.config)
    assert tree.extra["rustc_text"] == shipped["CONFIG_RUSTC_VERSION_TEXT"].strip('"')
    assert tree.extra["root"].endswith("/roots/trixie-rust1.85.1-amd64")
    # the prepared tree kept Rust (and the Rust drivers) as shipped
    prepared = read_config(tree.build / ".config")
    assert prepared["CONFIG_RUST"] == "y" and prepared.get("CONFIG_AX88796B_RUST_PHY") == "y"
    ko = tmp_path / "livepatch-version73.ko"
    r = klpforge("build", "--distro", f"debian:{RELEASE_73}", str(KPATCHES / "02-version-new-function.patch"),
                 "-o", str(ko))
    assert r.returncode == 0, r.stderr[-3000:]
    info = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=False)
    assert info.stdout.startswith(f"{RELEASE_73} SMP"), info.stdout
    v = klpforge("verify", str(ko), "--distro", f"debian:{RELEASE_73}", "--check", "cat /proc/version",
                 "--expect", f"klpforge: new function in {RELEASE_73}", "--timeout", "600")
    _verified(v)


ENDBR64 = bytes.fromhex("f30f1efa")


def test_pointer_only_function_and_call_into_a_new_function(tree612: DistroTree, tmp_path: Path) -> None:
    """version_proc_show() is reached only through a function pointer (proc_create_single); the fix makes it
    call a new function of the patch. QEMU's CPU checks no ENDBR and (its TCG CPU is "Not affected" by
    retbleed, so retbleed=stuff is not taken) runs no call-depth accounting, so both are checked structurally
    in the .ko: the replacement keeps its ENDBR (an indirect call lands on it; a CET CPU faults without one);
    the new function is 16-byte aligned behind 16 single-byte NOPs and its call is listed in .call_sites, which
    is what 6.12 arch/x86/kernel/callthunks.c needs to put its accounting thunk there at load (patch_call,
    patch_dest: "Invalid padding area" otherwise). Then the patch is proven in the shipped kernel."""
    from klpforge.elf import ElfFile

    ko = tmp_path / "livepatch-version.ko"
    r, rep = _build([KPATCHES / "02-version-new-function.patch"], ko)
    assert r.returncode == 0, r.stderr[-3000:]
    (obj,) = rep["objects"]
    (f,) = obj["functions"]
    assert f["old_name"] == "version_proc_show"
    elf = ElfFile.open(ko, require_rel=True)

    def where(name: str) -> tuple[int, int, int, bytes]:
        i = elf.sym_names.index(name)
        sec = int(elf.syms["shndx"][i])
        return sec, int(elf.syms["value"][i]), int(elf.syms["size"][i]), elf.section_bytes(sec)

    sec_f, v_f, size_f, data_f = where(f["new_symbol"])
    assert data_f[v_f:v_f + 4] == ENDBR64, "the pointer-only function lost its ENDBR"
    sec_n, v_n, _, data_n = where("klpforge_version_note")
    assert v_n % 16 == 0 and data_n[v_n - 16:v_n] == b"\x90" * 16, data_n[max(0, v_n - 16):v_n].hex()
    assert data_n[v_n:v_n + 4] != ENDBR64, "gcc gives a static function whose address is never taken no ENDBR"
    # the call from the replacement into the new function, and its .call_sites entry
    calls = []
    r_f = elf.relocs(elf.reloc_sections[sec_f])
    for off, sym, add in zip(r_f["offset"].tolist(), r_f["sym"].tolist(), r_f["addend"].tolist(), strict=True):
        if v_f <= off < v_f + size_f and data_f[off - 1] == 0xE8 and int(elf.syms["shndx"][sym]) == sec_n \
                and int(elf.syms["value"][sym]) + add + 4 == v_n:
            calls.append(off - 1 - v_f)
    assert len(calls) == 1, calls
    assert (calls[0], "") in objtool_entries(ko, f["new_symbol"]).get(".call_sites", set())
    v = klpforge("verify", str(ko), "--distro", DISTRO, "--check", "cat /proc/version",
                 "--expect", f"klpforge: new function in {RELEASE}", "--timeout", "600")
    _verified(v)
