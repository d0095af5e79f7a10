"""Xen payloads end to end: built against Debian's hypervisor (packages and source fetched and cached),
loaded into it under QEMU with xen-livepatch. Slow: the first run builds the hypervisor once (~100 s CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.kbuild.testkernel import require_kernel

from .conftest import ROOT, SHARED

VERSION = "4.17.5+72-g01140da4e8-1"
DISTRO = f"debian-xen:{VERSION}"
FIXES = sorted((SHARED / "xen" / "patches").glob("*.patch"))
OWN = ROOT / "tests" / "data" / "xen" / "extra-version.patch"

pytestmark = pytest.mark.kernel


def _klp(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def xen_tree() -> Path:
    """Debian's Xen fetched and the hypervisor source built once (cached under the klpforge cache)."""
    from klpforge.util.errors import InputError
    from klpforge.xen.debian import DebianXen
    from klpforge.xen.tree import prepare_tree
    try:
        d = DebianXen(VERSION)
        b = d.fetch_binaries()
        return prepare_tree(d.fetch_source(), b.config, d.dir, jobs=2).root
    except InputError as e:
        if require_kernel():
            pytest.fail(f"Debian Xen {VERSION} unavailable: {e}")
        pytest.skip(f"Debian Xen {VERSION} unavailable: {e}")


def _build(tree: Path, patch: Path, out: Path) -> None:
    r = _klp("build", "--distro", DISTRO, "-s", str(tree), str(patch), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()


@pytest.mark.parametrize("patch", FIXES, ids=[p.stem for p in FIXES])
def test_security_fix_applies_and_reverts(xen_tree: Path, tmp_path: Path, patch: Path) -> None:
    out = tmp_path / f"{patch.stem[:30]}.livepatch"
    _build(xen_tree, patch, out)
    r = _klp("verify", str(out), "--distro", DISTRO, "--check", "cat /sys/hypervisor/version/extra",
             "--expect", ".5", timeout=900)
    assert r.returncode == 0, r.stderr
    for step in ("upload", "apply", "applied", "revert", "unload"):
        assert f"{step}" in r.stderr and "FAIL" not in r.stderr


def test_own_patch_visible_before_after_revert(xen_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "extra.livepatch"
    # no -s: the Debian source tree the fixture prepared comes from the cache
    r = _klp("build", "--distro", DISTRO, str(OWN), "-o", str(out))
    assert r.returncode == 0, r.stderr
    extra = "cat /sys/hypervisor/version/extra"
    r = _klp("verify", str(out), "--distro", DISTRO, "--before-check", extra, "--check", extra,
             "--expect=-klp-patched", "--after-check", extra, "--after-expect", ".5", timeout=900)
    assert r.returncode == 0, r.stderr
    before = r.stderr.split("before output:")[1].split("check output:")[0]
    after = r.stderr.split("after output:")[1]
    assert "| .5" in before and "klp-patched" not in before
    assert "| -klp-patched" in r.stderr.split("check output:")[1].split("after output:")[0]
    assert "| .5" in after and "klp-patched" not in after


def test_other_build_id_rejected_with_reason(xen_tree: Path, tmp_path: Path) -> None:
    # built against our own build of the same source: another build-id than Debian's hypervisor
    out = tmp_path / "other.livepatch"
    r = _klp("build", "--xen", "-s", str(xen_tree), "--xen-syms", str(xen_tree / "xen" / "xen-syms"),
             str(OWN), "-o", str(out))
    assert r.returncode == 0, r.stderr
    log = tmp_path / "console.log"
    r = _klp("verify", str(out), "--distro", DISTRO, "--check", "true", "--console-log", str(log), timeout=900)
    assert r.returncode == 1
    msg = " ".join(r.stderr.split())
    assert "step upload failed" in msg and "check against hypervisor build-id failed" in msg, msg
    assert "(XEN)" in log.read_text(errors="replace")



def test_load_and_unload_hooks_run(xen_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "hooks.livepatch"
    r = _klp("build", "--distro", DISTRO, "-s", str(xen_tree), str(ROOT / "tests/data/xen/hooks.patch"),
             "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "hooks: load, unload" in " ".join(r.stderr.split())
    log = tmp_path / "console.log"
    r = _klp("verify", str(out), "--distro", DISTRO, "--check", "cat /sys/hypervisor/version/extra",
             "--expect=-klp-hooked", "--console-log", str(log), timeout=900)
    assert r.returncode == 0, r.stderr
    text = log.read_text(errors="replace")
    loaded, unloaded = text.find("klpforge: load hook ran"), text.find("klpforge: unload hook ran")
    assert 0 <= loaded < unloaded, "load hook at upload, unload hook at unload"


def test_init_change_refused_before_anything_is_written(xen_tree: Path, tmp_path: Path) -> None:
    version_c = xen_tree / "xen" / "common" / "version.c"
    text = version_c.read_text()
    start = text.index("void __init xen_build_init(void)")
    end = text.index("\n}\n", start)
    patch = tmp_path / "init.patch"
    # a unified diff adding one statement at the end of the __init function, made with diff(1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "version.c").write_text(text)
    (tmp_path / "b" / "version.c").write_text(text[:end] + "\n    printk(\"init changed\\n\");" + text[end:])
    d = subprocess.run(["diff", "-u", "--label", "a/xen/common/version.c", "--label", "b/xen/common/version.c",
                        str(tmp_path / "a" / "version.c"), str(tmp_path / "b" / "version.c")],
                       capture_output=True, text=True, check=False)
    patch.write_text(d.stdout)
    out = tmp_path / "init.livepatch"
    r = _klp("build", "--distro", DISTRO, "-s", str(xen_tree), str(patch), "-o", str(out))
    assert r.returncode == 2, r.stderr
    msg = " ".join(r.stderr.split())
    assert "xen_build_init" in msg and ".init.text" in msg, msg
    assert not out.exists()
    assert version_c.read_text() == text  # the tree is restored


def test_included_c_file_reaches_the_compat_copy(xen_tree: Path, tmp_path: Path) -> None:
    """xen/common/compat/kernel.c includes ``../kernel.c`` (and x86_64/physdev.c ``../physdev.c``): gcc records
    the unfolded path, and a change to the included file must rebuild both objects (a missed compat copy
    would stay unpatched while the build exits 0)."""
    from klpforge.kbuild.patchfile import SourcePatch
    from klpforge.xen.pipeline import _objects
    from klpforge.xen.tree import XenTree

    t = XenTree(xen_tree)
    assert t.objects_for("xen/common/kernel.c") == ["common/compat/kernel.o", "common/kernel.o"]
    assert t.objects_for("xen/arch/x86/physdev.c") == ["arch/x86/physdev.o", "arch/x86/x86_64/physdev.o"]
    assert t.objects_for("xen/common/event_fifo.c") == ["common/event_fifo.o"]
    # headers reached through "../" are found too (include/public/arch-x86/../xen.h)
    assert "common/kernel.o" in t.objects_for("xen/include/public/xen.h")
    src = (xen_tree / "xen/common/multicall.c").read_text().splitlines()
    i = next(n for n, ln in enumerate(src) if ln.startswith("#include"))
    p = tmp_path / "multicall.patch"
    p.write_text(f"--- a/xen/common/multicall.c\n+++ b/xen/common/multicall.c\n@@ -{i + 1},1 +{i + 1},2 @@\n"
                 f" {src[i]}\n+#include <xen/lib.h>\n")
    assert _objects(t, SourcePatch.parse(p)) == ["common/compat/multicall.o", "common/multicall.o"]
