"""A fresh user's re-run of ../shared/cases: the variants and siblings the case tests did not cover.

- ``diff --target`` names the object as the kernel does (``mod->name``: Kbuild's ``-`` -> ``_``): the kernel
  matches ``.klp.rela.<obj>.`` by ``strcmp`` and skips a section of another name, so ``kvm-intel`` left every
  klp relocation unapplied;
- rodata-anon-shared in its "plain" forms (no ``-ffunction-sections``, no ``-fdata-sections``);
- ibt-sealed-global on a distribution kernel (``build --distro``): the seal list comes from the shipped
  ``vmlinuz``, named by the kallsyms capture (Debian 6.12 has ``CONFIG_X86_KERNEL_IBT=y`` and seals
  ``is_current_pgrp_orphaned``: the case was built and "verified" before); its sibling in a module target
  (the module loader seals the ``.ko``'s own list: ext4's ``ext4_count_dirs``).

Cost: the gcc cases ~1 min; the Debian 6.12 builds ~2.5 min each warm (skipped unless prepared).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.elf import ElfFile

from .conftest import SHARED
from .test_cases_diffb import Run, compile_unit

CASES = SHARED / "cases"


def _case_objects(name: str, tmp: Path, *extra: str) -> tuple[Path, Path]:
    d = CASES / name
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return (compile_unit((d / "orig.c").read_text(), tmp / "orig", *extra),
            compile_unit((d / "patched.c").read_text(), tmp / "patched", *extra))


def _diff(a: Path, b: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(out), "--symtab",
                           str(a), "-q", *args], capture_output=True, text=True, check=False)


def test_target_with_a_dash_is_the_kernels_module_name(tmp_path: Path) -> None:
    """``--target kvm-intel``: the klp sections and symbols name ``kvm_intel``, the name 6.1's
    ``klp_apply_section_relocs`` compares them with."""
    a, b = _case_objects("readmostly-new", tmp_path)
    out = tmp_path / "lp.o"
    r = _diff(a, b, out, "--target", "kvm-intel")
    assert r.returncode == 0, r.stderr
    elf = ElfFile.open(out)
    klp_secs = [n for n in elf.section_names if n.startswith(".klp.rela.")]
    klp_syms = sorted(n for n in elf.sym_names if n.startswith(".klp.sym."))
    assert klp_secs == [".klp.rela.kvm_intel.text.knob_read"]
    assert klp_syms == [".klp.sym.kvm_intel.knob_a,0", ".klp.sym.kvm_intel.knob_b,0"]


@pytest.mark.parametrize("target", ["bad/name", "kvm.intel", "x" * 56, ""])
def test_target_that_is_no_module_name_is_refused(target: str, tmp_path: Path) -> None:
    a, b = _case_objects("readmostly-new", tmp_path)
    out = tmp_path / "lp.o"
    r = _diff(a, b, out, "--target", target)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"klpforge diff: --target {target!r}: not a module name (vmlinux or a module's "
                                "name: letters, digits, '_' or '-', at most 55 characters; the kernel parses "
                                ".klp.rela.<obj>.<section> with %55[^.])")
    assert not out.exists()


@pytest.mark.parametrize("extra", [["-fno-function-sections"], ["-fno-function-sections", "-fno-data-sections"]],
                         ids=["text", "text-and-rodata"])
def test_case_rodata_anon_shared_plain(extra: list[str], tmp_path: Path) -> None:
    """expected.txt's plain variant: seed_high in .text beside seed_low, its constant in the same .rodata:
    only seed_low is replaced."""
    if not (CASES / "rodata-anon-shared").is_dir():
        pytest.skip("../shared/cases not present")
    d = CASES / "rodata-anon-shared"
    r = Run.sources((d / "orig.c").read_text(), (d / "patched.c").read_text(), tmp_path, *extra)
    assert r.code == 0, r.stderr
    assert r.replaced == ["seed_low"] and r.included == ["seed_low"]


# -- ibt-sealed-global on a kernel that ships no vmlinux --------------------------------------------------------


@pytest.mark.kernel
def test_seal_list_from_the_image_is_the_vmlinux_one() -> None:
    """The IBT test kernel: the seal list read from its bzImage (decompressed payload) names exactly the
    functions the linked vmlinux's own list does."""
    from klpforge.diff.emit.ibt import sealed_functions, sealed_in_image
    from klpforge.kbuild.testkernel import prepared_kernel

    lay = prepared_kernel(variant="ibt")
    if lay is None:
        pytest.skip("no IBT kernel (klpforge kernel prepare --variant ibt)")
    want = sealed_functions(lay.build / "vmlinux")
    assert want["is_current_pgrp_orphaned"] == [True]
    assert sealed_in_image(lay.bzimage, lay.build / "vmlinux") == want


@pytest.mark.distro
@pytest.mark.kernel
def test_distro_seal_list_from_vmlinuz_and_kallsyms() -> None:
    """Debian 6.12 (zstd image, IBT): the case's helper is sealed, a function whose address vmlinux stores
    (seq_read, in file_operations) is not; Debian 6.1 (xz image, no IBT) has no seal list."""
    from klpforge.diff.emit.ibt import sealed_in_image
    from klpforge.distro import debian

    got = {}
    for rel in ("6.12.117+deb13-amd64", "6.1.0-56-amd64"):
        root = debian.release_root(rel)
        img = root / "image" / "boot" / f"vmlinuz-{rel}"
        syms = root / "kallsyms-v2.readelf"
        if not (img.is_file() and syms.is_file()):
            pytest.skip(f"Debian {rel} not prepared")
        got[rel] = sealed_in_image(img, syms)
    new = got["6.12.117+deb13-amd64"]
    assert new["is_current_pgrp_orphaned"] == [True] and "seq_read" not in new
    assert got["6.1.0-56-amd64"] == {}


@pytest.mark.distro
@pytest.mark.kernel
def test_case_ibt_sealed_global_on_debian_612_is_refused(tmp_path: Path) -> None:
    """expected.txt of ibt-sealed-global on Debian's own IBT kernel: refused naming both functions, nothing
    written (before: built, and "verified" under QEMU, whose CPU checks no ENDBR)."""
    from klpforge.distro import debian

    rel = "6.12.117+deb13-amd64"
    patch = CASES / "build" / "ibt-sealed-global" / "fix.patch"
    if not (debian.release_root(rel) / "prepared.json").is_file() or not patch.is_file():
        pytest.skip(f"Debian {rel} not prepared or no shared case")
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    ko = tmp_path / "sealed.ko"
    r = subprocess.run([sys.executable, "-m", "klpforge", "build", "--distro", f"debian:{rel}", str(patch),
                        "-o", str(ko)], capture_output=True, text=True, check=False, timeout=1800)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("klpforge build: kernel_wait4 takes the address of is_current_pgrp_orphaned, whose "
                           "ENDBR the running kernel sealed at boot"), last
    assert not ko.exists()


#: the module form of the case: ext4_drop_inode (Debian 6.12.117 fs/ext4/super.c) calls the ext4 global
#: ext4_count_dirs through a pointer; no code of ext4 takes its address, so ext4.ko's .ibt_endbr_seal lists it
EXT4_SEALED = """--- a/fs/ext4/super.c
+++ b/fs/ext4/super.c
@@ -1459,6 +1459,14 @@
 \tif (!drop)
 \t\tdrop = fscrypt_drop_inode(inode);
\x20
+\t{
+\t\t/* the fix consults an ext4 helper through a pointer */
+\t\tunsigned long (*count_fn)(struct super_block *) = ext4_count_dirs;
+
+\t\tOPTIMIZER_HIDE_VAR(count_fn);
+\t\tif (unlikely(drop < 0))
+\t\t\tdrop = count_fn(inode->i_sb) != 0;
+\t}
 \ttrace_ext4_drop_inode(inode, drop);
 \treturn drop;
 }
"""


def _shipped_ext4_612() -> Path:
    from klpforge.distro import debian
    from klpforge.distro.modules import plain_module

    rel = "6.12.117+deb13-amd64"
    found = sorted((debian.release_root(rel) / "image").glob(f"usr/lib/modules/{rel}/kernel/fs/ext4/ext4.ko*"))
    if not found:
        pytest.skip(f"Debian {rel} not prepared")
    return plain_module(found[0])


@pytest.mark.distro
@pytest.mark.kernel
def test_module_seal_list_of_a_shipped_module() -> None:
    """ext4.ko of Debian 6.12: its own .ibt_endbr_seal (relocations into its text) lists ext4_count_dirs;
    ext4_file_open (its address is in ext4_file_operations) keeps its ENDBR."""
    from klpforge.diff.emit.ibt import sealed_in_module

    got = sealed_in_module(_shipped_ext4_612())
    assert got["ext4_count_dirs"] == [True]
    assert "ext4_file_open" not in got and len(got) > 100


@pytest.mark.distro
@pytest.mark.kernel
def test_module_sealed_helper_on_debian_612_is_refused(tmp_path: Path) -> None:
    _shipped_ext4_612()
    patch = tmp_path / "fix.patch"
    patch.write_text(EXT4_SEALED)
    ko = tmp_path / "sealed.ko"
    r = subprocess.run([sys.executable, "-m", "klpforge", "build", "--distro", "debian:6.12.117+deb13-amd64",
                        str(patch), "-o", str(ko)], capture_output=True, text=True, check=False, timeout=1800)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("klpforge build: ext4_drop_inode takes the address of ext4_count_dirs, whose ENDBR the "
                           "running kernel sealed when it loaded ext4 (it is on ext4's .ibt_endbr_seal list"), last
    assert not ko.exists()


@pytest.mark.kernel
def test_verify_wrong_kernel_file_prints_no_progress(tmp_path: Path) -> None:
    """A --kernel that is no bzImage is refused before "booting ..." is printed (it was printed first)."""
    from klpforge.kbuild.testkernel import prepared_kernel

    lay = prepared_kernel()
    if lay is None:
        pytest.skip("no test kernel")
    ko = lay.build / "samples/livepatch/livepatch-sample.ko"
    notimage = tmp_path / "notimage"
    notimage.write_text("plain text\n" * 100)  # longer than a boot header
    r = subprocess.run([sys.executable, "-m", "klpforge", "verify", str(ko), "--kernel", str(notimage), "--check",
                        "true"], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f'klpforge verify: {notimage}: not a bzImage (no "HdrS" boot header at 0x202: unknown format)\n'


#: the module form on a kernel tree: cleanup_work_func (6.1 samples/livepatch/livepatch-shadow-mod.c) calls
#: dummy_check through a pointer; nothing in the module takes its address, so its .ko seals the ENDBR
SHADOW_MOD_SEALED = """--- a/samples/livepatch/livepatch-shadow-mod.c
+++ b/samples/livepatch/livepatch-shadow-mod.c
@@ -177,7 +177,10 @@
 \tlist_for_each_entry_safe(d, tmp, &dummy_list, list) {
\x20
 \t\t/* Kick out and free any expired dummies */
-\t\tif (dummy_check(d, j)) {
+\t\tbool (*check)(struct dummy *d, unsigned long jiffies) = dummy_check;
+
+\t\tOPTIMIZER_HIDE_VAR(check);
+\t\tif (check(d, j)) {
 \t\t\tlist_del(&d->list);
 \t\t\tdummy_free(d);
 \t\t}
"""


@pytest.mark.kernel
def test_module_sealed_helper_on_the_ibt_tree_is_refused(tmp_path: Path) -> None:
    """The IBT test kernel: livepatch-shadow-mod.ko seals dummy_check; taking its address in the patch is
    refused naming the module (it was built, exit 0: only vmlinux's list was read)."""
    from klpforge.diff.emit.ibt import sealed_in_module
    from klpforge.kbuild.testkernel import prepared_kernel

    lay = prepared_kernel(variant="ibt")
    if lay is None:
        pytest.skip("no IBT kernel (klpforge kernel prepare --variant ibt)")
    mod = lay.build / "samples/livepatch/livepatch-shadow-mod.ko"
    assert sealed_in_module(mod)["dummy_check"] == [True]
    patch = tmp_path / "fix.patch"
    patch.write_text(SHADOW_MOD_SEALED)
    ko = tmp_path / "shadow.ko"
    r = subprocess.run([sys.executable, "-m", "klpforge", "build", "-s", str(lay.src), "-O", str(lay.build),
                        str(patch), "-o", str(ko)], capture_output=True, text=True, check=False, timeout=900)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("klpforge build: cleanup_work_func takes the address of dummy_check, whose ENDBR the "
                           "running kernel sealed when it loaded livepatch_shadow_mod"), last
    assert not ko.exists()


def test_demo_outdir_dumps_name_files_that_exist(tmp_path: Path) -> None:
    """README: ``klpforge demo --outdir DIR`` keeps the files; its ipa-clones dumps named the sources by the
    hidden work directory's absolute path, gone after the rename (``klpforge impact --dumps DIR/orig``
    printed ``/.../.DIR.xyz/orig.c:7``). Compiled by relative names, they name DIR's own files, and impact
    run in DIR shows them."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    run = [sys.executable, "-m", "klpforge"]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, from another working directory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([*run, "demo", "--outdir", "out"], cwd=tmp_path, capture_output=True, text=True, check=False,
                       env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for side in ("orig", "patched"):
        (dump,) = (out / side).glob("*.ipa-clones")
        files = {line.split(";")[3] for line in dump.read_text().splitlines()}
        assert files == {f"{side}.c"} and (out / f"{side}.c").is_file()
    r = subprocess.run([*run, "impact", "--dumps", "orig", "clamp_len"], cwd=out, capture_output=True, text=True,
                       check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert "demo_read (orig.c:12): replace" in r.stdout and str(tmp_path) not in r.stdout


@pytest.mark.kernel
def test_verify_module_of_another_release_is_refused_before_booting() -> None:
    """A module built for the 6.1 test kernel (6.1.192) given Debian's 6.1.0-56-amd64 image: refused from the
    image's own kernel_version string, in seconds (it booted ~100 s to fail insmod with "invalid module
    format", and the error line quoted unrelated guest log lines)."""
    from klpforge.distro import debian
    from klpforge.kbuild.testkernel import prepared_kernel
    from klpforge.qemu.verify import image_release

    lay = prepared_kernel()
    img = debian.release_root("6.1.0-56-amd64") / "image" / "boot" / "vmlinuz-6.1.0-56-amd64"
    if lay is None or not img.is_file():
        pytest.skip("needs the test kernel and Debian 6.1.0-56-amd64 prepared")
    assert image_release(img) == "6.1.0-56-amd64" and image_release(lay.bzimage) == "6.1.192"
    ko = lay.build / "samples/livepatch/livepatch-sample.ko"
    r = subprocess.run([sys.executable, "-m", "klpforge", "verify", str(ko), "--kernel", str(img), "--check", "true"],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("klpforge verify: refused: livepatch-sample.ko: built for kernel 6.1.192, not 6.1.0-56-amd64 "
                        "(vmlinuz-6.1.0-56-amd64's release): the guest's insmod would refuse it (vermagic)\n")


def test_guest_vermagic_complaint_is_quoted() -> None:
    """The guest log of a 6.1.192 module insmod-ed into Debian's 6.1.0-56-amd64 (captured in this run): the
    one-line failure quoted the two taint lines and dropped the one saying why."""
    from klpforge.qemu.verify import kernel_says

    dmesg = ("[    9.043771] livepatch_fix: module_layout: kernel tainted.\n"
             "[    9.043978] Disabling lock debugging due to kernel taint\n"
             "[    9.044220] livepatch_fix: version magic '6.1.192 mod_unload ' should be '6.1.0-56-amd64 SMP preempt "
             "mod_unload modversions '\n")
    said = kernel_says(dmesg)
    assert said[-1] == ("livepatch_fix: version magic '6.1.192 mod_unload ' should be '6.1.0-56-amd64 SMP preempt "
                        "mod_unload modversions '")
