"""Issue 17: what klpforge runs and reads is trusted and bounded, and it leaves nothing running.

Every case runs the real CLI (``python -m klpforge``) in a subprocess and checks the one stderr line, the
exit code and that no work was done (no output, nothing created in the cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PATCH = ROOT / "tests" / "distro_patches" / "00-nfsd-sequence-cve.patch"


def _klp(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def _one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ---------------------------------------------------------------- item 1: cache directories others can write


def test_cache_root_writable_by_others_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    p = _klp("kernel", "prepare", env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    line = _one_line(p)
    assert f"unsafe cache directory {cache}: it is writable by other users (mode 0777)" in line
    assert f"chmod go-w {cache}" in line
    assert _tree(cache) == []  # nothing unpacked, nothing built


def test_distro_debs_writable_by_others_is_refused_before_any_download(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    debs = cache / "distro" / "debian" / "debs"
    debs.mkdir(parents=True)
    debs.chmod(0o757)
    before = _tree(cache)
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {debs}: it is writable by other users (mode 0757)" in _one_line(p)
    assert _tree(cache) == before and not (tmp_path / "lp.ko").exists()


def test_directory_deep_in_a_prepared_tree_writable_by_others_is_refused(tmp_path: Path) -> None:
    """Not only the top: any directory under the release (here inside the prepared build tree)."""
    cache = tmp_path / "cache"
    deep = cache / "distro" / "debian" / "6.1.0-56-amd64" / "build" / "scripts" / "mod"
    deep.mkdir(parents=True)
    deep.chmod(0o777)
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {deep}: it is writable by other users" in _one_line(p)


def test_impact_index_cache_writable_by_others_is_refused(cc, tmp_path: Path) -> None:
    """``impact`` honours KLPFORGE_CACHE (item 7) and checks it like the others."""
    obj = cc("static int f(int x) { return x * 3; }\nint g(int x) { return f(x) + 1; }\n", "a",
             "-fdump-ipa-clones")
    cache = tmp_path / "cache"
    (cache / "impact").mkdir(parents=True)
    ok = _klp("impact", "--dumps", obj.parent, "f", env={"KLPFORGE_CACHE": str(cache)})
    assert ok.returncode == 0, ok.stderr
    assert list((cache / "impact").glob("*.npz")), "impact did not use KLPFORGE_CACHE"
    (cache / "impact").chmod(0o777)
    p = _klp("impact", "--dumps", obj.parent, "f", env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {cache / 'impact'}: it is writable by other users" in _one_line(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_cache_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    other = cache / "distro"
    other.mkdir(parents=True)
    os.chown(other, 65534, 65534)  # nobody
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    line = _one_line(p)
    assert f"unsafe cache directory {other}: it is owned by nobody, not by root" in line
    assert f"chown root {other}" in line


def test_private_cache_under_sticky_tmp_is_accepted(tmp_path: Path) -> None:
    """/tmp is world-writable but sticky and root's: others cannot replace our entries (ssh's rule too)."""
    from klpforge.fsutil import check_private_dir
    assert os.stat("/tmp").st_mode & 0o1000
    cache = tmp_path / "cache" / "kernel-6.1" / "build"
    cache.mkdir(parents=True)
    check_private_dir(tmp_path / "cache")  # does not raise
