"""Debian's Xen: the shipped hypervisor, its symbols, tools, dom0 kernel and source, in the klpforge cache.

Binary packages come with ``apt-get download`` + ``dpkg -x``; the source package (upstream tarball plus
Debian's ``debian/patches``, which change hypervisor code too: ``console_init_preirq``, ``init_intel`` in
4.17.5+72-g01140da4e8-1) from the Debian archive's pool, checked against the ``.dsc`` checksums.

>>> d = DebianXen.parse("debian-xen:4.17.5+72-g01140da4e8-1")   # doctest: +SKIP
>>> d.fetch_binaries().xen_syms.name                            # doctest: +SKIP
'xen-syms-4.17-amd64'
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..kbuild.prepare import cache_dir

__all__ = ["DebianXen", "XenBinaries", "DOM0_KERNEL", "pool_uri"]

#: dom0 kernel package (Debian bookworm 6.1; has CONFIG_XEN_PRIVCMD=m and /sys/hypervisor).
DOM0_KERNEL = os.environ.get("KLPFORGE_XEN_DOM0", "6.1.0-56-amd64")


def pool_uri() -> str:
    """The ``pool/main/x/xen`` directory of the Debian archive apt is configured with on this machine
    (``apt-get indextargets``: the mirror the user chose, never one we name); raises :class:`InputError`."""
    r = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI)"], capture_output=True, text=True,
                       check=False)
    uris = sorted({u.strip().rstrip("/") for u in r.stdout.split() if u.strip()})
    main = [u for u in uris if not u.endswith("-security")] or uris
    if not main:
        raise InputError("no Debian archive configured for apt (run apt-get update): cannot fetch Xen's source")
    return main[0] + "/pool/main/x/xen"
_LIBS = ("libxenmisc{m}", "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
         "libxentoollog1", "libxendevicemodel1", "libxentoolcore1", "libxenhypfs1", "libxenstore4")


@dataclass(frozen=True)
class XenBinaries:
    """Paths inside the unpacked packages."""

    root: Path
    xen: Path  # gunzipped multiboot image
    xen_syms: Path
    config: Path
    livepatch_tool: Path
    lib_dir: Path
    vmlinuz: Path
    modules: Path  # /lib/modules/<version>


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise InputError(f"{' '.join(cmd[:3])} failed: {(r.stderr or r.stdout).strip()[-400:]}")


class DebianXen:
    """One Debian Xen version (``debian-xen:VERSION``), cached under ``<cache>/xen-debian/VERSION``."""

    def __init__(self, version: str, cache: Path | None = None):
        if not re.fullmatch(r"\d+\.\d+\.[0-9A-Za-z.+~-]+-[0-9A-Za-z.+~]+", version):
            raise InputError(f"{version!r} is not a Debian Xen version (like 4.17.5+72-g01140da4e8-1)")
        self.version = version
        self.major = ".".join(version.split(".")[:2])
        self.dir = cache_dir("xen-debian", cache=cache) / version  # refused if others can write it

    @classmethod
    def parse(cls, distro: str, cache: Path | None = None) -> DebianXen:
        """From ``debian-xen:VERSION``; raises :class:`InputError` for another form."""
        kind, _, version = distro.partition(":")
        if kind != "debian-xen" or not version:
            raise InputError(f"--distro {distro!r}: expected debian-xen:VERSION "
                             "(e.g. debian-xen:4.17.5+72-g01140da4e8-1)")
        return cls(version, cache)

    def packages(self) -> list[str]:
        m, v = self.major, self.version
        pk = [f"xen-hypervisor-{m}-amd64={v}", f"xen-hypervisor-{m}-amd64-dbg={v}", f"xen-utils-{m}={v}"]
        pk += [f"{p.format(m=m)}={v}" for p in _LIBS]
        return pk + [f"linux-image-{DOM0_KERNEL}"]

    def fetch_binaries(self) -> XenBinaries:
        """Download and unpack the packages once; raises :class:`InputError` if apt cannot get them."""
        root = self.dir / "root"
        stamp = self.dir / ".binaries"
        if not stamp.is_file():
            shutil.rmtree(root, ignore_errors=True)
            dl = self.dir / "debs"
            dl.mkdir(parents=True, exist_ok=True)
            os.chmod(dl, 0o777)  # apt's _apt user writes here
            try:
                _run(["apt-get", "download", *self.packages()], dl)
            finally:
                os.chmod(dl, 0o755)  # writable by others no longer than the download: cache_dir refuses it
            tmp = self.dir / f".root.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for deb in sorted(dl.glob("*.deb")):
                _run(["dpkg-deb", "-x", str(deb), str(tmp)], dl)
            gz = tmp / "boot" / f"xen-{self.major}-amd64.gz"
            if not gz.is_file():
                raise InputError(f"{gz.name} missing from xen-hypervisor-{self.major}-amd64")
            (tmp / "boot" / f"xen-{self.major}-amd64").write_bytes(gzip.decompress(gz.read_bytes()))
            os.replace(tmp, root)
            stamp.write_text(self.version + "\n")
        mods = sorted((root / "lib" / "modules").glob("6.*"))
        if not mods:
            raise InputError(f"no dom0 kernel modules under {root}/lib/modules")
        return XenBinaries(
            root=root, xen=root / "boot" / f"xen-{self.major}-amd64",
            xen_syms=root / "usr" / "lib" / "debug" / "boot" / f"xen-syms-{self.major}-amd64",
            config=root / "boot" / f"xen-{self.major}-amd64.config",
            livepatch_tool=root / "usr" / "lib" / f"xen-{self.major}" / "bin" / "xen-livepatch",
            lib_dir=root / "usr" / "lib" / "x86_64-linux-gnu",
            vmlinuz=next(iter(sorted((root / "boot").glob("vmlinuz-*")))), modules=mods[-1])

    def _pool_file(self, name: str, sha256: str | None, dest: Path) -> Path:
        out = dest / name
        if out.is_file() and (sha256 is None or hashlib.sha256(out.read_bytes()).hexdigest() == sha256):
            return out
        url = f"{pool_uri()}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=120) as r:
                data = r.read()
        except OSError as e:
            raise InputError(f"cannot download {url}: {e}") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"{name}: checksum differs from the .dsc")
        tmp = dest / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, out)
        return out

    def fetch_source(self) -> Path:
        """The source tarball with Debian's patches applied, repacked once as ``source.tar``
        (for :func:`klpforge.xen.tree.prepare_tree`); raises :class:`InputError` on failure."""
        out = self.dir / "source.tar"
        if out.is_file():
            return out
        dl = self.dir / "src"
        dl.mkdir(parents=True, exist_ok=True)
        up, _, _rev = self.version.rpartition("-")
        dsc = self._pool_file(f"xen_{self.version}.dsc", None, dl).read_text()
        sums = dict((n, s) for s, _size, n in re.findall(r"^ ([0-9a-f]{64}) (\d+) (\S+)$", dsc, re.M))
        names = [n for n in sums if n.endswith((".orig.tar.xz", ".orig.tar.gz", ".debian.tar.xz"))]
        if len(names) != 2:
            raise InputError(f"xen_{self.version}.dsc: expected an orig and a debian tarball, found {names}")
        files = {n: self._pool_file(n, sums[n], dl) for n in names}
        with tempfile.TemporaryDirectory(prefix="klpforge-xensrc-", dir=self.dir) as td:
            work = Path(td) / f"xen-{up}"
            work.mkdir()
            orig = next(p for n, p in files.items() if ".orig." in n)
            deb = next(p for n, p in files.items() if n.endswith(".debian.tar.xz"))
            _run(["tar", "-xf", str(orig), "--strip-components=1", "-C", str(work)], dl)
            _run(["tar", "-xf", str(deb), "-C", str(work)], dl)
            series = work / "debian" / "patches" / "series"
            for line in series.read_text().splitlines():
                line = line.split("#")[0].strip()
                if line:
                    _run(["patch", "-p1", "--batch", "-s", "-i", str(work / "debian" / "patches" / line)], work)
            tmp = self.dir / f".source.tar.{os.getpid()}"
            with tarfile.open(tmp, "w") as tf:
                tf.add(work, arcname=f"xen-{up}")
            os.replace(tmp, out)
        return out
