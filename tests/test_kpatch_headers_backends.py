"""kpatch-build patches that include ``kpatch-macros.h``/``kpatch-syscall.h``/``kpatch.h`` build on every backend
(issue 16 item 9): the Debian backend (``--distro``) and its plain form compile the patched objects with
klpforge's header directory on the include path, as the kernel-tree build does; a Xen payload gets one clear
line instead of a missing Linux header.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from klpforge.distro.base import DistroTree
from klpforge.kbuild.pipeline import data_include_dir

from .test_distro_debian import DISTRO, debian_tree, klpforge  # noqa: F401 - the session fixture

KPATCHES = Path(__file__).parent / "kernel_patches"


@pytest.mark.distro
@pytest.mark.kernel
def test_callbacks_and_shadow_patch_on_distro(debian_tree: DistroTree, tmp_path: Path) -> None:  # noqa: F811
    """The test kernel's kpatch-callback patch, unchanged, on Debian's kernel: built and proven (callbacks ran,
    the shadow variable counted)."""
    ko = tmp_path / "livepatch-cb.ko"
    r = klpforge("build", "--distro", DISTRO, str(KPATCHES / "06-uptime-callbacks-shadow.patch"), "-o", str(ko),
                 "-j2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kpatch-macros.h: No such file" not in r.stderr
    for kind in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
        assert f"carried: {kind} callback" in r.stderr
    v = klpforge("verify", str(ko), "--distro", DISTRO, "--check",
                 "cat /proc/uptime >/dev/null; cat /proc/uptime; dmesg | grep -q 'klpforge-cb: post_patch' && "
                 "echo callbacks-ran", "--expect", "klpforge-calls=2\ncallbacks-ran", "--timeout", "400")
    assert v.returncode == 0, v.stderr[-3000:]


@pytest.mark.distro
@pytest.mark.kernel
def test_kpatch_syscall_patch_on_distro(debian_tree: DistroTree, tmp_path: Path) -> None:  # noqa: F811
    """``KPATCH_SYSCALL_DEFINE1`` from ``kpatch-syscall.h`` on Debian's kernel: only the syscall entries."""
    ko = tmp_path / "livepatch-sys.ko"
    rep = tmp_path / "r.json"
    r = klpforge("build", "--distro", DISTRO, str(KPATCHES / "11-kpatch-syscall.patch"), "-o", str(ko), "--json",
                 str(rep), "-j2")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    funcs = {f["old_name"] for o in json.loads(rep.read_text())["objects"] for f in o["functions"]}
    assert funcs == {"__x64_sys_newuname", "__ia32_sys_newuname"}  # Debian: CONFIG_IA32_EMULATION=y


def test_kpatch_headers_refused_in_xen_code(tmp_path: Path) -> None:
    """Xen's compiles define ``__XEN__``: each kpatch header stops at once, naming Xen's hook header."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    for header in ("kpatch-macros.h", "kpatch-syscall.h", "kpatch.h"):
        src = tmp_path / "x.c"
        src.write_text(f'#include "{header}"\n')
        r = subprocess.run([gcc, "-D__XEN__", f"-I{data_include_dir()}", "-c", str(src), "-o",
                            str(tmp_path / "x.o")], capture_output=True, text=True, check=False)
        assert r.returncode != 0
        assert (f"#error \"{header} is for Linux live patches; a Xen payload uses klpforge's xen-livepatch-hooks.h "
                "(KLP_XEN_LOAD_HOOK and the other hooks): docs/xen.md\"") in r.stderr, r.stderr
        assert "No such file" not in r.stderr
