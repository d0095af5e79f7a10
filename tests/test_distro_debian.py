"""The kernel Debian ships (bookworm, 6.1.0-56-amd64 = linux 6.1.192-2): live patches built without a full
kernel build from Debian's own packages, proven in that very kernel under QEMU.

The packages are downloaded (``apt-get download``) and the tree prepared on demand into the klpforge cache:
about 2 minutes and 220 MB the first time. Without a prepared tree these tests skip, unless
``KLPFORGE_REQUIRE_KERNEL=1`` (CI) or ``KLPFORGE_DISTRO=1`` asks to prepare it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.distro.base import DistroTree

pytestmark = [pytest.mark.distro, pytest.mark.kernel]

RELEASE = "6.1.0-56-amd64"
DISTRO = f"debian:{RELEASE}"
PATCHES = Path(__file__).parent / "distro_patches"


def klpforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def debian_tree() -> DistroTree:
    from klpforge.distro import debian

    root = debian.release_root(RELEASE)
    prepared = (root / "prepared.json").is_file()
    if not prepared and not (os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1"
                             or os.environ.get("KLPFORGE_DISTRO") == "1"):
        pytest.skip(f"Debian {RELEASE} not prepared (KLPFORGE_DISTRO=1 downloads and prepares it, ~2 min)")
    return debian.prepare_tree(RELEASE)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_nfsd_security_fix_end_to_end(debian_tree: DistroTree, tmp_path: Path) -> None:
    """CI acceptance: the 6.1.192-2 -> 6.1.192-3 nfsd fix loads into the shipped 6.1.0-56 kernel with nfsd
    loaded, finishes its transition, lists nfsd4_sequence, then disables and unloads."""
    pristine = debian_tree.src / "fs/nfsd/nfs4state.c"
    before = _sha(pristine)
    ko = tmp_path / "livepatch-nfsd.ko"
    rep = tmp_path / "report.json"
    r = klpforge("build", "--distro", DISTRO, str(PATCHES / "00-nfsd-sequence-cve.patch"), "-o", str(ko),
                 "--json", str(rep))
    assert r.returncode == 0, r.stderr
    assert _sha(pristine) == before, "the cached pristine source was modified"
    report = json.loads(rep.read_text())
    assert report["release"] == RELEASE
    (obj,) = report["objects"]
    assert obj["object"] == "fs/nfsd/nfs4state.o" and obj["target"] == "nfsd"
    assert [f["old_name"] for f in obj["functions"]] == ["nfsd4_sequence"]
    (proof,) = obj["source_matches_binary"]
    assert proof["name"] == "nfsd4_sequence" and proof["ok"] and proof["shipped"] == proof["ours"]
    info = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=False)
    assert info.stdout.startswith(f"{RELEASE} SMP preempt mod_unload modversions")

    check = "grep -q '^nfsd ' /proc/modules && echo nfsd-loaded; ls /sys/kernel/livepatch/livepatch_nfsd/nfsd"
    v = klpforge("verify", str(ko), "--distro", DISTRO, "--load-modules", "nfsd", "--check", check,
                 "--expect", "nfsd-loaded\nnfsd4_sequence,1", "--timeout", "400")
    assert v.returncode == 0, v.stderr
    for step in ("boot", "preload", "insmod", "enabled", "transition", "check", "disable", "rmmod"):
        assert f"{step}" in v.stderr
    assert "verified livepatch-nfsd.ko" in v.stderr
