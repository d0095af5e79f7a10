"""Debian's Xen: the shipped hypervisor, its symbols, tools, dom0 kernel and source, in the klpforge cache.

Binary packages come from klpforge's own apt configuration (:mod:`klpforge.distro.apt`: bookworm and
bookworm-security, so a version only the security archive serves, ``4.17.7+13-g2445b30a44-0+deb12u1``, is
fetched from where the signed index says), each checked against the index's SHA-256 before it is unpacked;
``dpkg -x`` unpacks. The source package (upstream tarball plus Debian's ``debian/patches``, which change
hypervisor code too: ``console_init_preirq``, ``init_intel`` in 4.17.5+72-g01140da4e8-1) comes with
``apt-get source --download-only`` from a ``deb-src`` root of the same suites (apt checks the files against
the signed ``Sources`` index). An unknown version is refused listing the versions that exist.

>>> d = DebianXen.parse("debian-xen:4.17.5+72-g01140da4e8-1")   # doctest: +SKIP
>>> d.fetch_binaries().xen_syms.name                            # doctest: +SKIP
'xen-syms-4.17-amd64'
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..distro.apt import PackageRecord, apt_root
from ..util import proc
from ..util.errors import InputError
from ..util.fsutil import cache_dir

__all__ = ["DebianXen", "XenBinaries", "DOM0_KERNEL", "SOURCE_SUITES"]

#: Where Debian 12's Xen source packages live (the point releases and the security updates).
SOURCE_SUITES = ("bookworm", "bookworm-updates", "bookworm-security")

#: dom0 kernel package (Debian bookworm 6.1; has CONFIG_XEN_PRIVCMD=m and /sys/hypervisor).
DOM0_KERNEL = os.environ.get("KLPFORGE_XEN_DOM0", "6.1.0-56-amd64")


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
    r = proc.run(cmd, cwd=cwd, capture_output=True, text=True)  # ends with klpforge (issue 17 item 4)
    if r.returncode != 0:
        raise InputError(f"{' '.join(cmd[:3])} failed: {(r.stderr or r.stdout).strip()[-400:]}")


class DebianXen:
    """One Debian Xen version (``debian-xen:VERSION``), cached under ``<cache>/xen-debian/VERSION``."""

    def __init__(self, version: str, cache: Path | None = None):
        if not re.fullmatch(r"\d+\.\d+\.[0-9A-Za-z.+~-]+-[0-9A-Za-z.+~]+", version):
            raise InputError(f"{version!r} is not a Debian Xen version (like 4.17.5+72-g01140da4e8-1)")
        self.version = version
        self.major = ".".join(version.split(".")[:2])
        self.cache = cache
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

    def _records(self) -> list[PackageRecord]:
        """The signed index's record of every package (the dom0 kernel: its newest version); an unknown
        Xen version is refused with the versions that exist (``apt-cache madison``)."""
        apt = apt_root(self.cache)
        wanted: list[tuple[str, str]] = []
        for spec in self.packages():
            pkg, _, ver = spec.partition("=")
            wanted.append((pkg, ver or apt.newest(pkg)))
        apt.record(*wanted[0])  # first: its refusal lists the hypervisor's versions
        return apt.records(wanted)

    def fetch_binaries(self) -> XenBinaries:
        """Download, verify and unpack the packages once; raises :class:`InputError` if apt cannot get them.

        The unpacked root is reused only when its stamp lists the SHA-256 the signed index gives for each
        package (a root made from unverified input, or by an older klpforge, is unpacked again).
        """
        root = self.dir / "root"
        stamp = self.dir / ".binaries.json"
        recs = self._records()
        want = {r.package: r.sha256 for r in recs}
        try:
            trusted = json.loads(stamp.read_text()).get("debs") == want and root.is_dir()
        except (OSError, ValueError):
            trusted = False
        if not trusted:
            stamp.unlink(missing_ok=True)
            (self.dir / ".binaries").unlink(missing_ok=True)  # older klpforge: names only
            shutil.rmtree(root, ignore_errors=True)
            apt = apt_root(self.cache)
            debs = [apt.fetch(r, self.dir / "debs") for r in recs]
            tmp = self.dir / f".root.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(tmp)], self.dir)
            gz = tmp / "boot" / f"xen-{self.major}-amd64.gz"
            if not gz.is_file():
                raise InputError(f"{gz.name} missing from xen-hypervisor-{self.major}-amd64")
            (tmp / "boot" / f"xen-{self.major}-amd64").write_bytes(gzip.decompress(gz.read_bytes()))
            os.replace(tmp, root)
            stamp.write_text(json.dumps({"version": self.version, "debs": want}, indent=1) + "\n")
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

    def fetch_source(self) -> Path:
        """The source tarball with Debian's patches applied, repacked once as ``source.tar``
        (for :func:`klpforge.xen.tree.prepare_tree`); raises :class:`InputError` on failure."""
        out = self.dir / "source.tar"
        made = self.dir / "source.tar.json"  # written after the files were fetched through apt (verified)
        if out.is_file() and made.is_file():
            return out
        made.unlink(missing_ok=True)
        up = self.version.rpartition("-")[0]
        dl = self.dir / "src"
        got = apt_root(self.cache, SOURCE_SUITES).download_source("xen", self.version, dl)
        names = [p.name for p in got if p.name.endswith((".orig.tar.xz", ".orig.tar.gz", ".debian.tar.xz"))]
        if len(names) != 2:
            raise InputError(f"xen {self.version}: expected an orig and a debian tarball, found {names}")
        files = {n: dl / n for n in names}
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
        made.write_text(json.dumps({"version": self.version, "files": names}) + "\n")
        return out
