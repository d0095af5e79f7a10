"""klpforge's own apt configuration and the verified package fetch every backend uses.

Nothing here reads or changes the system's apt sources: a cache-owned apt root
(``<cache>/apt/``: ``etc/sources.list``, ``etc/apt.conf``, ``state/lists``, ``cache/``) names the Debian
suites klpforge builds for (:data:`SUITES`), each signed by Debian's archive keyring
(``signed-by=/usr/share/keyrings/debian-archive-keyring.gpg``). ``APT_CONFIG`` points apt at our
``apt.conf``, which moves ``Dir::Etc`` (so ``/etc/apt/apt.conf.d``, ``sources.list.d``, preferences and
trusted keys of the host are never read), ``Dir::State`` and ``Dir::Cache`` into the cache (apt 2.6 reads
``APT_CONFIG`` before ``Dir::Etc::parts``: apt-pkg/init.cc ``pkgInitConfig``).

Trust chain: apt verifies each suite's ``InRelease`` signature and the ``Packages`` index against it; the
``SHA256`` and ``Size`` of a package come from that index (``apt-cache show pkg=version``), and every
``.deb`` is checked against them after download *and* each time it is taken from the cache
(:meth:`AptRoot.fetch`): a tampered file (even a valid archive) or a truncated one is removed and fetched
again. Downloads go to a private temporary directory and are renamed into place only when verified;
apt runs as a child of :mod:`klpforge.util.proc`, so it ends with klpforge (even after SIGKILL), and the
directory of a killed fetch is removed by the next one (:func:`_download_dir`).

The archive host is the one the machine's own apt uses (``/etc/apt/sources.list*`` is only read for the
host name; ``KLPFORGE_DEBIAN_MIRROR=http://host/debian`` overrides it); without either, fetching is refused
with one line saying so.

>>> [s.name for s in SUITES][:3]
['bookworm', 'bookworm-updates', 'bookworm-security']
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..util import proc
from ..util.errors import InputError
from ..util.fsutil import atomic_write, cache_root, check_private_dir, tree_lock

__all__ = ["Suite", "SUITES", "KEYRING", "AptRoot", "PackageRecord", "apt_root", "mirrors", "sha256_file",
           "disk_full_message"]

#: Debian's archive keyring (package ``debian-archive-keyring``): the only key our sources trust.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

#: Seconds an ``apt-get update`` of our lists stays fresh.
UPDATE_EVERY = 3600


@dataclass(frozen=True)
class Suite:
    """A suite of the Debian archive: ``name`` (``trixie-security``), ``archive`` (``debian`` or
    ``debian-security``) and ``check_valid_until`` (False only for a suite whose mirror copy is known to
    outlive its ``Valid-Until``; the signature is still checked)."""

    name: str
    archive: str = "debian"
    check_valid_until: bool = True


#: The suites klpforge fetches from: Debian 12 (6.1, Xen 4.17), Debian 13 (6.12) with its backports
#: (7.x) and security updates, and testing. forky (testing) is refreshed by Debian's mirrors
#: irregularly; its Release' ``Valid-Until`` is not enforced (signature still verified).
SUITES: tuple[Suite, ...] = (
    Suite("bookworm"), Suite("bookworm-updates"), Suite("bookworm-security", "debian-security"),
    Suite("trixie"), Suite("trixie-updates"), Suite("trixie-security", "debian-security"),
    Suite("trixie-backports"), Suite("forky", check_valid_until=False),
)


def mirrors(etc: Path = Path("/etc/apt")) -> dict[str, str]:
    """``{"debian": URI, "debian-security": URI}``: the Debian hosts the machine's apt uses.

    Only URIs whose path ends in ``/debian`` or ``/debian-security`` count (other vendors' repositories
    in the host's sources are ignored); ``KLPFORGE_DEBIAN_MIRROR`` overrides the main archive, the
    security archive then lives next to it.
    """
    env = os.environ.get("KLPFORGE_DEBIAN_MIRROR", "").rstrip("/")
    found: dict[str, str] = {}
    if env:
        found["debian"] = env
        found["debian-security"] = env.rsplit("/", 1)[0] + "/debian-security"
        return found
    texts: list[str] = []
    for p in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text(errors="replace"))
        except OSError:
            continue
    for uri in re.findall(r"(?:^URIs:|^deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?)\s*(\S+)", "\n".join(texts), re.M):
        uri = uri.rstrip("/")
        for arch in ("debian-security", "debian"):
            if uri.endswith("/" + arch) and arch not in found and "snapshot." not in uri:
                found[arch] = uri
    if "debian" not in found:
        raise InputError(f"no Debian archive in {etc}/sources.list*: set KLPFORGE_DEBIAN_MIRROR=http://HOST/debian")
    found.setdefault("debian-security", found["debian"].rsplit("/", 1)[0] + "/debian-security")
    return found


@dataclass(frozen=True)
class PackageRecord:
    """One package version as apt's signed ``Packages`` index describes it."""

    package: str
    version: str
    architecture: str
    filename: str  # pool path
    size: int
    sha256: str
    depends: str = ""

    @property
    def deb_name(self) -> str:
        """The file name ``apt-get download`` gives it (``:`` of an epoch as ``%3a``)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def disk_full_message(where: Path, what: str) -> str:
    """The one line for ENOSPC."""
    try:
        free = shutil.disk_usage(where).free // (1 << 20)
        tail = f" ({free} MiB free)"
    except OSError:
        tail = ""
    return (f"no space left on the device holding {where}{tail} while {what}: free space or point "
            "KLPFORGE_CACHE at a larger file system")


Say = Callable[[str], None]


class AptRoot:
    """The cache-owned apt configuration (``<cache>/apt``); create with :func:`apt_root`."""

    def __init__(self, root: Path, source_suites: tuple[str, ...] = ()):
        self.root = root
        self.conf = root / "etc" / "apt.conf"
        #: with these, the root indexes source packages (``deb-src``) of those suites only (Xen's source:
        #: :mod:`klpforge.xen.debian`); a separate root so that binary users never download ``Sources``
        self.source_suites = source_suites

    # -- configuration -------------------------------------------------------------------------
    def sources_text(self) -> str:
        """Our ``sources.list``: one line per suite, main only, signed by :data:`KEYRING`."""
        m = mirrors()
        lines = ["# written by klpforge: its own apt sources (the system's are never read)"]
        for s in SUITES:
            if self.source_suites and s.name not in self.source_suites:
                continue
            opts = f"signed-by={KEYRING}" + ("" if s.check_valid_until else " check-valid-until=no")
            lines.append(f"deb{'-src' if self.source_suites else ''} [{opts}] {m[s.archive]} {s.name} main")
        return "\n".join(lines) + "\n"

    def conf_text(self) -> str:
        r = self.root
        return "\n".join([
            "// written by klpforge: nothing of the host's apt configuration is read",
            f'Dir::Etc "{r}/etc/";', 'Dir::Etc::main "/dev/null";', 'Dir::Etc::parts "apt.conf.d";',
            'Dir::Etc::sourcelist "sources.list";', 'Dir::Etc::sourceparts "sources.list.d";',
            'Dir::Etc::trusted "/dev/null";', 'Dir::Etc::trustedparts "trusted.gpg.d";',
            f'Dir::State "{r}/state/";', f'Dir::State::status "{r}/state/status";',
            f'Dir::Cache "{r}/cache/";', f'Dir::Log "{r}/log/";',
            'APT::Architecture "amd64";', 'APT::Architectures { "amd64"; };',
            'Acquire::Languages "none";', 'Acquire::Retries "2";', ""])

    def ensure(self) -> None:
        """Write the configuration (idempotent)."""
        for d in ("etc/apt.conf.d", "etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d",
                  "state/lists/partial", "cache/archives/partial", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.write_text("")
        for path, text in ((self.root / "etc" / "sources.list", self.sources_text()), (self.conf, self.conf_text())):
            try:
                same = path.read_text() == text
            except OSError:
                same = False
            if not same:
                atomic_write(path, text, 0o644)

    def env(self) -> dict[str, str]:
        """Environment for every apt tool: ``APT_CONFIG`` is ours, messages untranslated."""
        return {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C.UTF-8"}

    def run(self, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        # through proc: apt-get and its download methods end with klpforge (a signal, or SIGKILL via
        # PR_SET_PDEATHSIG and the watchdog) instead of finishing an orphaned download (issue 17 item 4)
        try:
            return proc.run(args, cwd=cwd, env=self.env(), capture_output=True, text=True)
        except OSError:
            raise InputError(f"{args[0]} not found: klpforge fetches Debian packages with apt") from None

    # -- index ---------------------------------------------------------------------------------
    def update(self, say: Say | None = None, force: bool = False) -> None:
        """``apt-get update`` of our lists, at most once per :data:`UPDATE_EVERY` unless ``force``.

        Raises :class:`InputError` with apt's error line when no index could be fetched; a suite that
        fails while others work is reported through ``say`` only.
        """
        marker = self.root / "state" / "updated"
        with tree_lock(self.root / "state" / ".klpforge-lock"):
            age = time.time() - marker.stat().st_mtime if marker.is_file() else float("inf")
            # a forced refresh (a version apt does not know) still waits a few minutes between tries
            if age < (300 if force else UPDATE_EVERY):
                return
            if say:
                say("refreshing klpforge's apt index (Debian: " + ", ".join(s.name for s in SUITES) + ")")
            r = self.run(["apt-get", "update", "-q"])
            errs = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith(("E:", "Err:"))]
            if "No space left on device" in r.stderr:
                raise InputError(disk_full_message(self.root, "refreshing the apt index"))
            if r.returncode != 0 and not self._have_lists():
                raise InputError(f"apt-get update (klpforge's sources in {self.root}/etc) failed: "
                                 + (errs[-1] if errs else (r.stderr or r.stdout).strip()[-300:]))
            if errs and say:
                say(f"apt-get update: {errs[-1]}")
            marker.write_text(time.ctime() + "\n")

    def _have_lists(self) -> bool:
        return any((self.root / "state" / "lists").glob("*_Sources" if self.source_suites else "*_Packages"))

    def _ensure_lists(self, say: Say | None) -> None:
        if not self._have_lists():
            self.update(say)

    def records(self, wanted: list[tuple[str, str]], say: Say | None = None) -> list[PackageRecord]:
        """:meth:`record` of several ``(package, version)`` with one ``apt-cache show`` when all are known."""
        self._ensure_lists(say)
        r = self.run(["apt-cache", "show", *(f"{p}={v}" for p, v in wanted)])
        got = {(x.package, x.version): x for x in reversed(_parse_stanzas(r.stdout))}
        return [got[w] if w in got else self.record(*w, say=say) for w in wanted]

    def download_source(self, package: str, version: str, dest: Path, say: Say | None = None) -> list[Path]:
        """``apt-get source --download-only package=version`` into ``dest`` (a root with ``source_suites``):
        apt checks the ``.dsc`` and the tarballs against the signed ``Sources`` index. Returns the files.

        Raises :class:`InputError` naming the versions that exist when the index does not have it.
        """
        self._ensure_lists(say)
        dest.mkdir(parents=True, exist_ok=True)
        tmp, held = _download_dir(dest)
        try:
            _give_to_apt_sandbox(tmp)
            r = self.run(["apt-get", "source", "--download-only", "-q", f"{package}={version}"], cwd=tmp)
            if r.returncode != 0:
                text = r.stderr + r.stdout
                if "No space left on device" in text:
                    raise InputError(disk_full_message(dest, f"downloading the source of {package}"))
                s = self.run(["apt-cache", "showsrc", package])
                have = re.findall(r"^Version: (\S+)", s.stdout, re.M)
                if have and version not in have:
                    raise InputError(f"source package {package} has no version {version} in the Debian archive "
                                     f"({', '.join(self.source_suites)}); it has: {', '.join(dict.fromkeys(have))}")
                errs = [ln for ln in text.splitlines() if ln.startswith("E:")]
                raise InputError(f"apt-get source {package}={version} failed (the signed index lists it, "
                                 "the archive did not serve it): " + (errs[0] if errs else text.strip()[-300:]))
            out: list[Path] = []
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    if os.geteuid() == 0:
                        os.chown(f, 0, 0)
                    os.replace(f, dest / f.name)
                    out.append(dest / f.name)
            return out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(held)

    def versions(self, package: str, say: Say | None = None) -> list[tuple[str, str]]:
        """``[(version, suite)]`` of ``package`` in our index, newest first (``apt-cache madison``)."""
        self._ensure_lists(say)
        r = self.run(["apt-cache", "madison", package])
        out: list[tuple[str, str]] = []
        for ln in r.stdout.splitlines():
            parts = [p.strip() for p in ln.split("|")]
            if len(parts) >= 3 and parts[0] == package:
                suite = parts[2].split()[1].split("/")[0] if len(parts[2].split()) > 1 else parts[2]
                out.append((parts[1], suite))
        return out

    def record(self, package: str, version: str, say: Say | None = None) -> PackageRecord:
        """The index entry of ``package=version``; refreshes the index once if apt does not know it.

        Raises :class:`InputError` naming the versions that exist (with their suites) when it does not.
        """
        for attempt in (0, 1):
            self._ensure_lists(say)
            r = self.run(["apt-cache", "show", f"{package}={version}"])
            recs = _parse_stanzas(r.stdout)
            recs = [x for x in recs if x.package == package and x.version == version]
            if recs:
                return recs[0]
            if attempt == 0:
                self.update(say, force=True)
        have = self.versions(package)
        if not have:
            raise InputError(f"the Debian archive ({', '.join(s.name for s in SUITES)}) has no package {package}")
        listed = ", ".join(f"{v} ({s})" for v, s in dict.fromkeys(have))
        raise InputError(f"{package} has no version {version} in the Debian archive; it has: {listed}")

    def newest(self, package: str, say: Say | None = None) -> str:
        """The highest version of ``package`` in our index; raises :class:`InputError` if none."""
        have = self.versions(package, say)
        if not have:
            self.update(say, force=True)
            have = self.versions(package, say)
        if not have:
            raise InputError(f"the Debian archive ({', '.join(s.name for s in SUITES)}) has no package {package}")
        return highest([v for v, _ in have])

    # -- packages ------------------------------------------------------------------------------
    def fetch(self, rec: PackageRecord, dest: Path, say: Say | None = None) -> Path:
        """``dest/<deb_name>``, verified against ``rec`` (size and SHA-256 of the signed index).

        A cached file is checked on every call; one that differs (tampered, truncated) is removed and
        downloaded again. The download runs in a private directory and is renamed into ``dest`` only after
        it verifies. Raises :class:`InputError` (download failure, disk full, hash mismatch after download).
        """
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / rec.deb_name
        if out.is_file():
            bad = verify_deb(out, rec)
            if bad is None:
                return out
            if say:
                say(f"cached {out.name} {bad}: fetching it again")
            out.unlink()
        if say:
            say(f"downloading {rec.package}={rec.version} ({rec.size / 1e6:.0f} MB)")
        try:
            tmp, held = _download_dir(dest)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(disk_full_message(dest, f"downloading {rec.package}")) from None
            raise
        try:
            _give_to_apt_sandbox(tmp)
            r = self.run(["apt-get", "download", "-q", f"{rec.package}={rec.version}"], cwd=tmp)
            got = tmp / rec.deb_name
            if r.returncode != 0 or not got.is_file():
                text = r.stderr + r.stdout
                if "No space left on device" in text or "ENOSPC" in text:
                    raise InputError(disk_full_message(dest, f"downloading {rec.package}"))
                errs = [ln for ln in text.splitlines() if ln.startswith(("E:", "Err:"))]
                raise InputError(f"apt-get download {rec.package}={rec.version} failed: "
                                 + (errs[-1] if errs else text.strip()[-300:] or "no .deb"))
            bad = verify_deb(got, rec)
            if bad is not None:
                raise InputError(f"downloaded {got.name} {bad}: refusing it (mirror or network tampering?)")
            if os.geteuid() == 0:
                os.chown(got, 0, 0)
            os.chmod(got, 0o644)
            os.replace(got, out)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(disk_full_message(dest, f"downloading {rec.package}")) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(held)
        return out


def verify_deb(path: Path, rec: PackageRecord) -> str | None:
    """``None`` when ``path`` has the index's size and SHA-256, else what differs (for a message)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size != rec.size:
        return f"has {size} bytes, the signed index says {rec.size} (truncated or replaced)"
    got = sha256_file(path)
    if got != rec.sha256:
        return f"has SHA-256 {got[:16]}..., the signed index says {rec.sha256[:16]}... (modified)"
    return None


def _download_dir(dest: Path) -> tuple[Path, int]:
    """A new private ``dest/.download-*`` directory and an open descriptor holding ``flock`` on it (close
    it after removing the directory).

    A klpforge killed mid-download (SIGKILL, power loss) cannot remove its directory: the partial ``.deb``
    there would stay for ever. Each run therefore first removes the ``.download-*`` directories whose lock
    nobody holds -- the kernel drops a dead process' ``flock`` -- and leaves those of a concurrent fetch.
    Raises ``OSError`` (``ENOSPC`` included).
    """
    for old in dest.glob(".download-*"):
        try:
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # in use by another fetch
            continue
        shutil.rmtree(old, ignore_errors=True)
        os.close(fd)
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if tmp.is_dir():  # not removed by a concurrent run between mkdtemp and flock
            return tmp, fd
        os.close(fd)


def _give_to_apt_sandbox(tmp: Path) -> None:
    """apt downloads as user ``_apt`` when run as root; let it write our private download directory
    (else apt falls back to downloading as root and warns)."""
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("_apt").pw_uid
    except KeyError:
        return
    os.chown(tmp, uid, 0)
    os.chmod(tmp, 0o700)


def _parse_stanzas(text: str) -> list[PackageRecord]:
    out: list[PackageRecord] = []
    for stanza in re.split(r"\n\s*\n", text):
        f: dict[str, str] = {}
        for ln in stanza.splitlines():
            m = re.match(r"([A-Za-z0-9-]+):\s?(.*)", ln)
            if m:
                f[m.group(1)] = m.group(2).strip()
        if {"Package", "Version", "SHA256", "Size", "Filename"} <= f.keys():
            out.append(PackageRecord(f["Package"], f["Version"], f.get("Architecture", "amd64"), f["Filename"],
                                     int(f["Size"]), f["SHA256"].lower(), f.get("Depends", "")))
    return out


def highest(versions: list[str]) -> str:
    """The highest Debian version (``dpkg --compare-versions``)."""
    best = versions[0]
    for v in versions[1:]:
        if subprocess.run(["dpkg", "--compare-versions", v, "gt", best], check=False).returncode == 0:
            best = v
    return best


def apt_root(cache: str | os.PathLike[str] | None = None, source_suites: tuple[str, ...] = ()) -> AptRoot:
    """klpforge's apt root under ``<cache>/apt`` (configuration written on first use); with
    ``source_suites``, the source-package root ``<cache>/apt-src`` of those suites."""
    d = cache_root(cache) / ("apt-src" if source_suites else "apt")
    # the directories above and this one; not below: apt hands its lists' partial/auxfiles directories to its
    # sandbox user _apt, and nothing there is trusted unverified (apt checks the signed index, we each .deb)
    check_private_dir(d, walk=False)
    a = AptRoot(d, source_suites)
    try:
        a.ensure()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InputError(disk_full_message(a.root, "writing klpforge's apt configuration")) from None
        raise InputError(f"cannot write klpforge's apt configuration in {a.root}: {e.strerror}") from None
    return a
