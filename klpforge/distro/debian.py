"""Debian backend: ``linux-image-<release>``, ``linux-headers-<release>`` (+ ``-common``, ``linux-kbuild``) and
the matching ``linux-source-<major.minor>``, fetched with ``apt-get download`` and unpacked with ``dpkg -x``
(nothing is installed), cached per kernel release under ``<klpforge cache>/distro/debian/<release>/``.

Facts this relies on (Debian 12 "bookworm", linux 6.1.192-2 = ABI 6.1.0-56):

* ``linux-image-<release>`` and ``linux-source-6.1`` share the package version (``6.1.192-2``); the image
  ships ``boot/vmlinuz-*``, ``boot/config-*`` (``CONFIG_CC_VERSION_TEXT`` names the compiler), a stub
  ``System.map`` and uncompressed ``lib/modules/<release>/kernel/**.ko`` with symbol tables, no ``modules.dep``.
* ``/usr/src/linux-headers-<release>/Makefile`` includes ``/usr/src/linux-headers-<abi>-common/Makefile`` by
  absolute path; the unpacked copy is rewritten to include the unpacked ``-common`` tree.

>>> package_names("6.1.0-56-amd64")["source"]
'linux-source-6.1'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_write
from ..kbuild.prepare import cache_dir
from .base import DistroTree, Say, run_logged, tree_lock

__all__ = ["prepare_tree", "package_names", "package_version", "release_root", "fetch_packages",
           "KCFLAGS", "compiler_for_config", "check_compiler", "make_command"]

#: Flags of every compile in a prepared tree: a section per function/data object (the diff correlates by
#: section) and GCC's clone dump (``klpforge impact`` explains functions the patch did not touch).
KCFLAGS = "-ffunction-sections -fdata-sections -fdump-ipa-clones"

_STAMP = "prepared.json"
_FORMAT = 1


def package_names(release: str) -> dict[str, str]:
    """Debian package names for kernel release ``release`` (``6.1.0-56-amd64``).

    >>> package_names("6.1.0-56-amd64")["headers_common"]
    'linux-headers-6.1.0-56-common'
    """
    m = re.fullmatch(r"(\d+)\.(\d+)\.\d+-(\d+)(?:-(\w+))?-([\w]+)", release)
    if not m:
        raise InputError(f"{release}: not a Debian kernel release (expected e.g. 6.1.0-56-amd64)")
    mm = f"{m.group(1)}.{m.group(2)}"
    abi = release[: -len(m.group(5)) - 1]
    if m.group(4):  # rt/cloud flavours: 6.1.0-56-rt-amd64 -> common-rt
        abi = abi[: -len(m.group(4)) - 1]
    common = f"linux-headers-{abi}-common" + (f"-{m.group(4)}" if m.group(4) else "")
    return {"image": f"linux-image-{release}", "headers": f"linux-headers-{release}",
            "headers_common": common, "kbuild": f"linux-kbuild-{mm}", "source": f"linux-source-{mm}"}


def release_root(release: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/distro/debian/<release>``."""
    cache_dir("distro", "debian", "debs", cache=cache)  # refused if others can write it (or a parent)
    return cache_dir("distro", "debian", release, cache=cache)


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError:
        raise InputError(f"{args[0]} not found: the Debian backend needs apt and dpkg") from None


def _apt_update_once(root: Path) -> None:
    """``apt-get update`` (the package index only knows what the archive serves now)."""
    marker = root.parent / ".apt-updated"
    if marker.is_file() and time.time() - marker.stat().st_mtime < 3600:
        return
    r = _apt(["apt-get", "update", "-qq"])
    if r.returncode == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(time.ctime() + "\n")


def package_version(pkg: str, root: Path | None = None) -> str:
    """Highest version of ``pkg`` apt knows (``apt-cache madison``); refreshes the index once if unknown."""
    for attempt in (0, 1):
        r = _apt(["apt-cache", "madison", pkg])
        versions = [ln.split("|")[1].strip() for ln in r.stdout.splitlines() if ln.count("|") >= 2
                    and ln.split("|")[0].strip() == pkg]
        if versions:
            return _highest(versions)
        if attempt == 0 and root is not None:
            _apt_update_once(root)
    raise InputError(f"apt knows no package {pkg} (is the release right, and bookworm-security in "
                     "sources.list? Debian's archive serves only recent kernel ABIs)")


def _highest(versions: list[str]) -> str:
    best = versions[0]
    for v in versions[1:]:
        if subprocess.run(["dpkg", "--compare-versions", v, "gt", best], check=False).returncode == 0:
            best = v
    return best


def fetch_packages(release: str, root: Path, say: Say) -> dict[str, Path]:
    """Download (``apt-get download``, cached in ``<cache>/distro/debian/debs``) the packages of ``release``.

    Returns role -> ``.deb`` path (roles of :func:`package_names`). The source package is pinned to the
    image's version (``linux-source-6.1=6.1.192-2`` for ``6.1.0-56-amd64``); ``linux-kbuild`` takes the
    newest (its version only has to be ``>=`` the headers').
    """
    names = package_names(release)
    debs = root.parent / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    version = package_version(names["image"], root)
    want = {role: (pkg, None if role == "kbuild" else version) for role, pkg in names.items()}
    out: dict[str, Path] = {}
    for role, (pkg, ver) in want.items():
        ver = ver or package_version(pkg, root)
        fname_ver = ver.replace(":", "%3a")
        have = sorted(debs.glob(f"{pkg}_{fname_ver}_*.deb"))
        if not have:
            say(f"downloading {pkg}={ver}")
            r = _apt(["apt-get", "download", "-q", f"{pkg}={ver}"], cwd=debs)
            if r.returncode != 0:
                _apt_update_once(root)
                r = _apt(["apt-get", "download", "-q", f"{pkg}={ver}"], cwd=debs)
            have = sorted(debs.glob(f"{pkg}_{fname_ver}_*.deb"))
            if r.returncode != 0 or not have:
                msg = (r.stderr or r.stdout).strip().splitlines()
                raise InputError(f"apt-get download {pkg}={ver} failed: {msg[-1] if msg else 'no .deb'}")
        out[role] = have[0]
    return out


def _dpkg_x(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    r = _apt(["dpkg", "-x", str(deb), str(dest)])
    if r.returncode != 0:
        raise InputError(f"dpkg -x {deb.name} failed: {r.stderr.strip()[:300]}")


def compiler_for_config(config: Path) -> tuple[str, str]:
    """``(compiler command, CONFIG_CC_VERSION_TEXT)`` of a shipped config.

    The text is the first line of ``<cc> --version`` as the distribution's build ran it (Debian:
    ``gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0``), so its first word names the command.
    """
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="([^"]*)"', config.read_text(errors="replace"), re.M)
    if not m:
        raise InputError(f"{config}: no CONFIG_CC_VERSION_TEXT (not a kernel >= 5.8 config?)")
    text = m.group(1)
    return text.split()[0], text


def check_compiler(config: Path) -> str:
    """The compiler to build with; refuse when the one on PATH is not the distribution's.

    Objects from another compiler version have other inlining and cloning decisions, so the functions the
    diff replaces would not be the ones in the shipped binary.
    """
    cc, want = compiler_for_config(config)
    exe = shutil.which(cc)
    if exe is None:
        raise InputError(f"the kernel was built with '{want}' but {cc} is not on PATH "
                         f"(install the same compiler version)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    have = (r.stdout.splitlines() or [""])[0].strip()
    if have != want:
        raise InputError(f"compiler mismatch: the kernel was built with '{want}' but {cc} here is "
                         f"'{have}'; objects built now would not match the shipped binary")
    return cc


def _fix_headers_makefile(headers_root: Path, release: str) -> Path:
    """Point the flavour headers' ``include /usr/src/...-common/Makefile`` at the unpacked copy."""
    hdr = headers_root / "usr/src" / f"linux-headers-{release}"
    mk = hdr / "Makefile"
    if not mk.is_file():
        raise InputError(f"{mk}: missing from the headers package")
    text = mk.read_text()
    fixed = re.sub(r"^include /usr/src/", f"include {headers_root}/usr/src/", text, flags=re.M)
    if fixed != text:
        mk.write_text(fixed)
    return hdr


def _stamp_key(debs: dict[str, Path], cc_text: str) -> dict[str, object]:
    return {"format": _FORMAT, "debs": {k: v.name for k, v in sorted(debs.items())}, "cc": cc_text,
            "kcflags": KCFLAGS}


def _make_base(tree: DistroTree, cc: str) -> list[str]:
    return ["make", "-C", str(tree.src), f"O={tree.build}", "ARCH=x86_64", f"CC={cc}", f"HOSTCC={cc}",
            f"KCFLAGS={KCFLAGS}"]


def make_command(tree: DistroTree, *targets: str, jobs: int = 1) -> list[str]:
    """``make`` of ``targets`` in a prepared tree, with the flags the tree was prepared with."""
    return [*_make_base(tree, tree.extra.get("cc", "gcc")), f"-j{max(1, jobs)}", *targets]


def prepare_tree(release: str, cache: str | os.PathLike[str] | None = None, jobs: int | None = None,
                 progress: Say | None = None) -> DistroTree:
    """:func:`_prepare_tree`; a release directory this call created is removed again if it failed with
    nothing in it but the lock (an unknown release leaves no empty directory in the cache)."""
    root = release_root(release, cache)
    debs = root.parent / "debs"
    created, debs_created = not root.exists(), not debs.exists()
    try:
        return _prepare_tree(release, cache, jobs, progress)
    except BaseException:
        if created and root.is_dir() and {p.name for p in root.iterdir()} <= {".lock"}:
            shutil.rmtree(root, ignore_errors=True)
        if debs_created:
            with contextlib.suppress(OSError):
                debs.rmdir()  # only if nothing was downloaded
        raise


def _prepare_tree(release: str, cache: str | os.PathLike[str] | None = None, jobs: int | None = None,
                  progress: Say | None = None) -> DistroTree:
    """Fetch, unpack and prepare Debian's kernel ``release`` once; later calls return the cached tree.

    Steps: download the packages, ``dpkg -x`` the image and headers, unpack the source tarball (kept
    pristine), copy the shipped ``/boot/config-<release>`` to ``build/.config`` and run
    ``make O=build olddefconfig prepare modules_prepare`` (and ``usr/gen_init_cpio``) with :data:`KCFLAGS`: about
    1-2 minutes on 2 cores, never a full build. Holds ``<root>/.lock`` while preparing.

    Raises :class:`InputError` (unknown release, download failure, wrong compiler, failed make).
    """
    say = progress or (lambda _m: None)
    root = release_root(release, cache)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".lock"
    names = package_names(release)
    mm = names["source"].removeprefix("linux-source-")
    src = root / "src" / f"linux-source-{mm}"
    tree = DistroTree(src=src, build=root / "build", config=root / "image/boot" / f"config-{release}",
                      release=release, image=root / "image",
                      headers=root / "headers/usr/src" / f"linux-headers-{release}",
                      vmlinuz=root / "image/boot" / f"vmlinuz-{release}", kcflags=KCFLAGS, lock=lock)
    with tree_lock(lock):
        stamp = root / _STAMP
        if stamp.is_file():
            try:
                st = json.loads(stamp.read_text())
                if st.get("format") == _FORMAT and (tree.build / "scripts/mod/modpost").is_file():
                    tree.extra.update(st.get("extra", {}))
                    return tree
            except (OSError, ValueError):
                pass
        debs = fetch_packages(release, root, say)
        if not tree.config.is_file():
            say(f"unpacking {debs['image'].name}")
            shutil.rmtree(root / "image", ignore_errors=True)
            _dpkg_x(debs["image"], root / "image.tmp")
            os.replace(root / "image.tmp", root / "image")
        cc = check_compiler(tree.config)
        _, cc_text = compiler_for_config(tree.config)
        if not (root / "headers/usr/src" / f"linux-headers-{release}/Makefile").is_file():
            say("unpacking the headers packages")
            tmp = root / "headers.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for role in ("headers", "headers_common", "kbuild"):
                _dpkg_x(debs[role], tmp)
            shutil.rmtree(root / "headers", ignore_errors=True)
            os.replace(tmp, root / "headers")
        _fix_headers_makefile(root / "headers", release)
        if not (src / "Makefile").is_file():
            say(f"unpacking {debs['source'].name} (about 20 s)")
            tmp = root / "src.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _dpkg_x(debs["source"], tmp / "deb")
            tarballs = sorted((tmp / "deb/usr/src").glob("linux-source-*.tar.*"))
            if not tarballs:
                raise InputError(f"{debs['source'].name} holds no linux-source tarball")
            (tmp / "tree").mkdir()
            subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp / "tree")], check=True)
            top = next((tmp / "tree").iterdir())
            shutil.rmtree(root / "src", ignore_errors=True)
            (root / "src").mkdir()
            os.replace(top, src)
            shutil.rmtree(tmp, ignore_errors=True)
        tree.extra["cc"] = cc
        log = root / "prepare.log"
        log.write_text("")
        shutil.rmtree(tree.build, ignore_errors=True)
        tree.build.mkdir(parents=True)
        shutil.copyfile(tree.config, tree.build / ".config")
        n = jobs or min(2, os.cpu_count() or 1)
        say(f"configuring and preparing {src.name} with the shipped config (make -j{n}, log: {log})")
        run_logged(make_command(tree, "olddefconfig", jobs=1), log)
        _check_config_kept(tree)
        run_logged(make_command(tree, "prepare", "modules_prepare", jobs=n), log)
        # the initramfs tool: a host program, no single-target rule for it in 6.1 Kbuild
        (tree.build / "usr").mkdir(exist_ok=True)
        run_logged([cc, "-O2", "-o", str(tree.build / "usr/gen_init_cpio"), str(src / "usr/gen_init_cpio.c")], log)
        key = _stamp_key(debs, cc_text)
        atomic_write(stamp, json.dumps({**key, "extra": tree.extra, "prepared": time.time()}, indent=1) + "\n")
    return tree


#: Options Kconfig derives from the build host's tools that do not change generated code: without pahole
#: (``dwarves``) the BTF options drop out; BTF is debug data, not code.
_TOOL_DERIVED = ("CONFIG_CC_VERSION_TEXT", "CONFIG_GCC_VERSION", "CONFIG_AS_VERSION", "CONFIG_LD_VERSION",
                 "CONFIG_PAHOLE_", "CONFIG_DEBUG_INFO_BTF_MODULES", "CONFIG_MODULE_ALLOW_BTF_MISMATCH")


def _check_config_kept(tree: DistroTree) -> None:
    """olddefconfig must keep every shipped option except the tool-derived ones (:data:`_TOOL_DERIVED`)."""
    def sets(p: Path) -> set[str]:
        return {ln for ln in p.read_text(errors="replace").splitlines()
                if ln.startswith("CONFIG_") and not ln.startswith(_TOOL_DERIVED)}
    lost = sorted(sets(tree.config) - sets(tree.build / ".config"))
    if lost:
        raise InputError(f"the shipped config does not survive olddefconfig here ({len(lost)} lines differ, "
                         f"e.g. {lost[0]}): different toolchain?")
