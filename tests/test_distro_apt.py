"""klpforge's own apt configuration and the verified fetch (issue 15, issue 17 items 1 and 3, issue 16 item 10).

Real packages from the Debian archive the machine reaches, in a private cache: a tampered (still valid) and a
truncated cached ``.deb`` are refused and fetched again, a full disk is one line, a fetch killed
mid-download (SIGKILL, SIGTERM) leaves no process and nothing under the final name and the next fetch succeeds,
a Xen version that only bookworm-security serves is found, an unknown version lists those that exist, and a
prepared-tree stamp is trusted only with the signed index's hashes. Skipped without network unless
``KLPFORGE_REQUIRE_KERNEL=1``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klpforge.distro import debian
from klpforge.distro.apt import KEYRING, SUITES, AptRoot, apt_root, sha256_file
from klpforge.util.errors import InputError

pytestmark = [pytest.mark.distro]

#: A small real package (2 MB) of the 6.12 release the issue names.
SMALL = ("linux-kbuild-6.12.117+deb13", "6.12.117-1")


def _online() -> bool:
    try:
        import urllib.request

        from klpforge.distro.apt import mirrors

        urllib.request.urlopen(mirrors()["debian"] + "/dists/trixie/InRelease", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def apt(tmp_path_factory: pytest.TempPathFactory) -> AptRoot:
    if not _online():
        if os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1":
            pytest.fail("the Debian archive is not reachable")
        pytest.skip("the Debian archive is not reachable")
    a = apt_root(tmp_path_factory.mktemp("cache"))
    a.update()
    return a


def test_configuration_is_our_own(apt: AptRoot) -> None:
    """Every suite, Debian's keyring via signed-by, and apt reading none of the host's configuration."""
    text = (apt.root / "etc/sources.list").read_text()
    for s in SUITES:
        assert f" {s.name} main" in text
    assert all(f"signed-by={KEYRING}" in ln for ln in text.splitlines() if ln.startswith("deb "))
    r = apt.run(["apt-config", "dump"])
    dump = r.stdout
    assert f'Dir::Etc "{apt.root}/etc/"' in dump and f'Dir::State "{apt.root}/state/"' in dump
    assert f'Dir::Cache "{apt.root}/cache/"' in dump
    # the host's sources are not among the index targets (only our lists exist)
    r = apt.run(["apt-get", "indextargets", "--format", "$(SITE) $(RELEASE)"])
    suites = {ln.split()[1] for ln in r.stdout.splitlines() if ln.strip()}
    assert suites == {s.name for s in SUITES} - {"forky"} or suites == {s.name for s in SUITES}
    assert list((apt.root / "state/lists").glob("*trixie-backports*Packages"))


def test_tampered_and_truncated_packages_are_fetched_again(apt: AptRoot, tmp_path: Path) -> None:
    rec = apt.record(*SMALL)
    debs = tmp_path / "debs"
    said: list[str] = []
    deb = apt.fetch(rec, debs, said.append)
    assert sha256_file(deb) == rec.sha256 and said == [f"downloading {SMALL[0]}={SMALL[1]} (2 MB)"]
    assert not [p for p in debs.iterdir() if p.name.startswith(".download-")]
    # a repacked package, still a valid archive: modpost replaced by a script
    x = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(x)], check=True)
    modpost = next(x.rglob("modpost"))
    modpost.write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    subprocess.run(["dpkg-deb", "-b", "-Znone", str(x), str(deb)], check=True, capture_output=True)
    assert subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True).returncode == 0
    said.clear()
    again = apt.fetch(rec, debs, said.append)
    assert said[0].startswith(f"cached {rec.deb_name} has ") and said[0].endswith("fetching it again")
    assert sha256_file(again) == rec.sha256
    # truncated (an interrupted download of an older klpforge)
    with again.open("r+b") as f:
        f.truncate(rec.size // 2)
    said.clear()
    again = apt.fetch(rec, debs, said.append)
    assert said[0] == (f"cached {rec.deb_name} has {rec.size // 2} bytes, the signed index says {rec.size} "
                       "(truncated or replaced): fetching it again")
    assert sha256_file(again) == rec.sha256
    # the good file is used as it is
    said.clear()
    apt.fetch(rec, debs, said.append)
    assert said == []


def test_full_disk_is_one_line(apt: AptRoot, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(InputError) as e:
            apt.fetch(apt.record(*SMALL), small / "debs")
        assert str(e.value).startswith(f"no space left on the device holding {small}/debs")
        assert "downloading linux-kbuild-6.12.117+deb13" in str(e.value) and "\n" not in str(e.value)
        assert not [p for p in (small / "debs").iterdir()], "a partial download was left behind"
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_security_only_xen_version_and_unknown_versions(apt: AptRoot) -> None:
    """Issue 16 item 10: 4.17.7+13 lives only in bookworm-security; the index says where (no 404)."""
    rec = apt.record("xen-hypervisor-4.17-amd64", "4.17.7+13-g2445b30a44-0+deb12u1")
    assert rec.filename.startswith("pool/updates/main/x/xen/")
    with pytest.raises(InputError) as e:
        apt.record("xen-hypervisor-4.17-amd64", "4.17.9-1")
    msg = str(e.value)
    assert msg.startswith("xen-hypervisor-4.17-amd64 has no version 4.17.9-1 in the Debian archive; it has: ")
    assert "4.17.7+13-g2445b30a44-0+deb12u1 (bookworm-security)" in msg and "4.17.5+72-g01140da4e8-1 (bookworm)" in msg


def test_release_packages_and_unknown_release(apt: AptRoot) -> None:
    cache = apt.root.parent
    recs = debian.package_records("6.12.117+deb13-amd64", cache)
    assert {r: (x.package, x.version) for r, x in recs.items()} == {
        "image": ("linux-image-6.12.117+deb13-amd64", "6.12.117-1"),
        "headers": ("linux-headers-6.12.117+deb13-amd64", "6.12.117-1"),
        "source": ("linux-source-6.12", "6.12.117-1"),
        "headers_common": ("linux-headers-6.12.117+deb13-common", "6.12.117-1"),
        "kbuild": ("linux-kbuild-6.12.117+deb13", "6.12.117-1")}
    bpo = debian.package_records("7.3.4+deb13-amd64", cache)
    assert bpo["source"].package == "linux-source-7.3" and bpo["source"].version == bpo["image"].version
    with pytest.raises(InputError, match=r"^the Debian archive has no linux-image-6.12.999\+deb13-amd64; "
                                         r"releases of 6.12 it has: .*6.12.117\+deb13-amd64"):
        debian.package_records("6.12.999+deb13-amd64", cache)


def test_prepared_stamp_needs_the_index_hashes(apt: AptRoot) -> None:
    """A tree is reused only when its stamp carries, per package, the hash the signed index gives."""
    cache = apt.root.parent
    recs = debian.package_records("6.12.117+deb13-amd64", cache)
    st = debian._stamp_key(recs, "x")
    assert debian._stamp_trusted(st, "6.12.117+deb13-amd64", cache)
    bad = {**st, "debs": {**st["debs"], "kbuild": {**st["debs"]["kbuild"], "sha256": "0" * 64}}}  # type: ignore[dict-item]
    assert not debian._stamp_trusted(bad, "6.12.117+deb13-amd64", cache)
    old = {**st, "format": 1, "debs": {r: rec.deb_name for r, rec in recs.items()}}
    assert not debian._stamp_trusted(old, "6.12.117+deb13-amd64", cache)


def test_unknown_release_cli_is_one_line(apt: AptRoot, tmp_path: Path) -> None:
    env = {**os.environ, "KLPFORGE_CACHE": str(apt.root.parent)}
    patch = tmp_path / "x.patch"
    patch.write_text("--- a/kernel/a.c\n+++ b/kernel/a.c\n@@ -1 +1 @@\n-a\n+b\n")
    r = subprocess.run([sys.executable, "-m", "klpforge", "build", "--distro", "debian:6.12.999+deb13-amd64",
                        str(patch), "-o", str(tmp_path / "o.ko")], capture_output=True, text=True, env=env,
                       check=False)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("[", "  "))]
    assert any("has no linux-image-6.12.999+deb13-amd64" in ln for ln in lines), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.ko").exists()
    shutil.rmtree(apt.root.parent / "distro" / "debian" / "6.12.999+deb13-amd64", ignore_errors=True)


def test_xen_packages_from_the_security_archive(apt: AptRoot) -> None:
    """Issue 16 item 10 through the Xen backend: every package of a security-only version resolves to the
    security archive's pool; an unknown version is refused listing the existing ones (no HTTP 404)."""
    from klpforge.xen.debian import DebianXen

    cache = apt.root.parent
    recs = DebianXen("4.17.7+13-g2445b30a44-0+deb12u1", cache)._records()
    xen = [r for r in recs if r.package.startswith(("xen-", "libxen"))]
    assert len(xen) == 13 and all(r.filename.startswith("pool/updates/main/x/xen/") for r in xen)
    assert all(len(r.sha256) == 64 for r in recs)
    with pytest.raises(InputError, match=r"^xen-hypervisor-4.17-amd64 has no version 4.17.9-1 in the Debian "
                                         r"archive; it has: 4.17.7\+13-g2445b30a44-0\+deb12u1 \(bookworm-security\)"):
        DebianXen("4.17.9-1", cache).fetch_binaries()


#: The child of the kill tests: the library fetch with the CLI's signal handling (``klpforge.cli.main``).
_FETCH_CHILD = r"""
import sys
import time
from pathlib import Path
from klpforge.distro.apt import apt_root
from klpforge.util.proc import Terminated, end_children, install_signal_handlers
install_signal_handlers()
try:
    a = apt_root(sys.argv[1])
    a.fetch(a.record(sys.argv[3], sys.argv[4]), Path(sys.argv[2]))
except Terminated as e:
    print(f"klpforge: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
finally:
    end_children()
"""


def _session(sid: int) -> list[str]:
    """``pid comm`` of every process still in session ``sid`` (zombies excluded)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[3]) == sid and rest[0] != "Z":
            out.append(f"{p.name} {comm}")
    return out


def _partial(debs: Path) -> int:
    """Bytes of the largest file under ``debs`` (the download in progress)."""
    return max((f.stat().st_size for f in debs.rglob("*") if f.is_file()), default=0) if debs.is_dir() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_download_killed_midway_leaves_a_cache_the_next_run_uses(apt: AptRoot, tmp_path: Path,
                                                                 sig: signal.Signals) -> None:
    """Issue 17 item 3 and 4: a fetch killed while apt-get downloads leaves nothing under the final name, no
    process of its session (apt-get, its http method) runs on, and the next fetch gets the verified package.

    The child's apt is slowed to 100 KB/s (``Acquire::http::Dl-Limit`` in our root's ``apt.conf.d``, which
    only this private cache has) so that the signal always lands mid-download whatever the mirror's speed.
    """
    rec = apt.record(*SMALL)
    debs = tmp_path / "debs"
    limit = apt.root / "etc" / "apt.conf.d" / "90test-slow"
    limit.write_text('Acquire::http::Dl-Limit "100";\n')
    try:
        child = subprocess.Popen([sys.executable, "-c", _FETCH_CHILD, str(apt.root.parent), str(debs), *SMALL],
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while _partial(debs) < 64 << 10 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        got = _partial(debs)
        assert child.poll() is None and 0 < got < rec.size, f"not caught mid-download ({got} bytes)"
        os.kill(child.pid, sig)
        _, err = child.communicate(timeout=30)
    finally:
        limit.unlink()
    if sig == signal.SIGTERM:
        assert child.returncode == 143 and err.strip() == "klpforge: terminated by SIGTERM", err
        # the fetch's own finally removed its download directory
        assert not list(debs.iterdir()), list(debs.iterdir())
    else:
        assert child.returncode == -signal.SIGKILL
    assert not (debs / rec.deb_name).exists(), "a partial download under the final name"
    # apt-get (PR_SET_PDEATHSIG) and its http method (the watchdog ends the group) go too; the watchdog
    # itself leaves once the groups are empty (GRACE + 2 s at most); an orphaned apt-get would still need
    # about 19 s at 100 KB/s
    deadline = time.monotonic() + 8
    while _session(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(child.pid) == [], "processes of the killed fetch still run"
    # nothing kept downloading: the partial file did not grow into a whole package after the kill
    assert _partial(debs) < rec.size
    said: list[str] = []
    deb = apt.fetch(rec, debs, said.append)
    assert said == [f"downloading {SMALL[0]}={SMALL[1]} (2 MB)"]
    assert sha256_file(deb) == rec.sha256
    # the killed run's download directory is removed by the next fetch (its flock died with it)
    assert sorted(p.name for p in debs.iterdir()) == [rec.deb_name]


def test_stale_download_directory_removed_unless_in_use(tmp_path: Path) -> None:
    """The ``.download-*`` directory of a killed fetch goes at the next fetch; a live one's stays."""
    from klpforge.distro.apt import _download_dir

    live, held = _download_dir(tmp_path)
    (live / "x.deb").write_bytes(b"partial")
    other, fd = _download_dir(tmp_path)
    assert live.is_dir() and other != live  # held by a running fetch: left alone
    os.close(held)  # its process died: the kernel dropped the flock
    again, fd2 = _download_dir(tmp_path)
    assert not live.exists() and other.is_dir() and again.is_dir()
    os.close(fd)
    os.close(fd2)
