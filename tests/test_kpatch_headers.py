"""The kpatch-build headers (issue 12 item 12) compile against the prepared kernel, every macro used,
with the flags Kbuild recorded for a real object; the syscall macros give kpatch's symbol layout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from klpforge.elf import ElfFile
from klpforge.elf import constants as C
from klpforge.kbuild.pipeline import SECTION_FLAGS, data_include_dir
from klpforge.kbuild.prepare import KernelLayout
from klpforge.kbuild.tree import KernelTree

pytestmark = pytest.mark.kernel

USES = r"""
#include <linux/module.h>
#include <trace/events/printk.h>
#include "kpatch-macros.h"
#include "kpatch-syscall.h"
#include "kpatch.h"

static int pre(struct klp_object *obj) { KPATCH_PRINTK("pre %s\n", obj->name); return 0; }
KPATCH_PRE_PATCH_CALLBACK(pre);
static void post(struct klp_object *obj) { KPATCH_PRINTK_DEFERRED("post\n"); }
KPATCH_POST_PATCH_CALLBACK(post);
static void hook(void) { }
KPATCH_UNLOAD_HOOK(hook);
KPATCH_IGNORE_SECTION(".data..klpf");
KPATCH_FORCE_UNSAFE(pre);

int klpf_shadow(void *obj)
{
	int *v = kpatch_shadow_alloc(obj, "klpf", sizeof(*v), GFP_KERNEL);

	if (!v || kpatch_shadow_get(obj, "klpf") != v)
		return -1;
	kpatch_shadow_free(obj, "klpf");
	return 0;
}

void klpf_static_call(void)
{
	KPATCH_STATIC_CALL(tp_func_console)(NULL, "x", 1);
}

KPATCH_SYSCALL_DEFINE2(klpf_test, int, a, unsigned long __user *, p)
{
	unsigned long v;

	if (get_user(v, p))
		return -EFAULT;
	return a + v;
}
"""


def test_kpatch_headers_compile_with_kernel_flags(kernel: KernelLayout, tmp_path: Path) -> None:
    tree = KernelTree(kernel.src, kernel.build)
    cc = tree.compile_command("fs/proc/version.o")
    src = tmp_path / "uses.c"
    src.write_text(USES)
    out = tmp_path / "uses.o"
    cmd = cc.redirected(out, f"{SECTION_FLAGS} -I{data_include_dir()}").replace(str(cc.source), str(src))
    r = subprocess.run(cmd, shell=True, cwd=tree.build, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    elf = ElfFile.open(out)
    syms = {n: (int(b), int(t)) for n, b, t in zip(elf.sym_names, elf.sym_bind, elf.sym_type, strict=True)}
    # kpatch's layout: the entry is the only global, the body is renamed, nothing is named __do_sys_*
    assert syms["__x64_sys_klpf_test"][0] == C.STB_GLOBAL
    assert not any(n.startswith("__do_sys_") for n in syms)
    assert all(syms[n][0] == C.STB_LOCAL for n in syms if n.startswith(("__kpatch_do_sys_", "__se_sys_")))
    names = set(elf.section_names)
    assert {".kpatch.callbacks.pre_patch", ".kpatch.callbacks.post_patch", ".kpatch.callbacks.pre_unpatch",
            ".kpatch.ignore.sections", ".kpatch.force"} <= names
    assert "__SCK__tp_func_console" in syms


SYSCALL_ONLY = r"""
#include <linux/module.h>
#include "kpatch-syscall.h"

KPATCH_SYSCALL_DEFINE2(klpf_test, int, a, unsigned long __user *, p)
{
	unsigned long v;

	if (get_user(v, p))
		return -EFAULT;
	return a + v;
}
MODULE_LICENSE("GPL");
"""


@pytest.mark.parametrize("arch,cross,config,entry", [
    ("arm64", "aarch64-linux-gnu-", "tinyconfig", "__arm64_sys_klpf_test"),
    ("s390", "s390x-linux-gnu-", "tinyconfig", "__s390x_sys_klpf_test"),
    ("powerpc", "powerpc64le-linux-gnu-", "ppc64le_defconfig", "sys_klpf_test"),
])
def test_kpatch_syscall_other_architectures(kernel: KernelLayout, tmp_path: Path, arch: str, cross: str,
                                            config: str, entry: str) -> None:
    """KPATCH_SYSCALL_DEFINEn builds each architecture's own entry (6.1 syscall wrappers), and no
    ``__do_sys_*`` symbol: the body is inlined or renamed, as with kpatch."""
    import shutil

    if shutil.which(cross + "gcc") is None:
        pytest.skip(f"{cross}gcc not installed")
    out, mod = tmp_path / "o", tmp_path / "m"
    mod.mkdir()
    make = ["make", "-s", "-C", str(kernel.src), f"O={out}", f"ARCH={arch}", f"CROSS_COMPILE={cross}"]
    subprocess.run([*make, config], check=True, capture_output=True)
    with (out / ".config").open("a") as f:
        f.write("CONFIG_MODULES=y\n")
    subprocess.run([*make, "olddefconfig"], check=True, capture_output=True)
    r = subprocess.run([*make, "-j2", "modules_prepare"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (mod / "klpft.c").write_text(SYSCALL_ONLY)
    (mod / "Kbuild").write_text("obj-m := klpft.o\n")
    r = subprocess.run([*make, f"M={mod}", "KBUILD_MODPOST_WARN=1", f"EXTRA_CFLAGS=-I{data_include_dir()}",
                        "modules"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    elf = ElfFile.open(mod / "klpft.o")
    syms = {n: int(b) for n, b, ndx in zip(elf.sym_names, elf.sym_bind, elf.syms["shndx"], strict=True) if ndx}
    assert syms.get(entry) == C.STB_GLOBAL, sorted(syms)
    assert not any(n.startswith("__do_sys_") for n in syms)
