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

from ..util import proc
from ..util.errors import InputError
from ..util.fsutil import atomic_write, cache_dir, tree_lock
from .apt import PackageRecord, apt_root, disk_full_message, highest
from .base import DistroTree, Say, run_logged
from .roots import RustToolchain, build_root, in_root, root_for_config, rust_of_config

__all__ = ["prepare_tree", "package_names", "package_version", "package_records", "release_root", "fetch_packages",
           "KCFLAGS", "compiler_for_config", "check_compiler", "make_command"]

#: Flags of every compile in a prepared tree: a section per function/data object (the diff correlates by
#: section) and GCC's clone dump (``klpforge impact`` explains functions the patch did not touch).
KCFLAGS = "-ffunction-sections -fdata-sections -fdump-ipa-clones"
#: The same for a ``CONFIG_RUST=y`` kernel built by GCC: ``make prepare`` runs bindgen (libclang) over the C
#: flags, KCFLAGS included, after removing the GCC-only ones it knows (7.3 ``rust/Makefile``
#: ``bindgen_skip_c_flags``), and clang rejects ``-fdump-ipa-clones`` ("unknown argument"). Such a tree has no
#: clone dumps: the report's ``impact`` says so.
KCFLAGS_RUST = "-ffunction-sections -fdata-sections"

_STAMP = "prepared.json"
_FORMAT = 2  # 2: debs recorded with the signed index's SHA-256


#: Packages a 7.x ``linux-image-<release>`` metapackage depends on for its files (7.3.4-1~bpo13+1).
_IMAGE_PARTS = ("base", "binary", "modules")

_RELEASE_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-(\d+)|\+deb(\d+))(?:-(rt|cloud))?-(\w+)")


def package_names(release: str) -> dict[str, str]:
    """Debian package names for kernel release ``release``.

    Two spellings: Debian 12's ``6.1.0-56-amd64`` (ABI number; ``linux-kbuild-6.1``) and Debian 13's
    ``6.12.117+deb13-amd64`` / backports' ``7.3.4+deb13-amd64`` (full version; ``linux-kbuild-6.12.117+deb13``).
    ``kbuild`` and ``headers_common`` are what the headers package depends on in both (checked against its
    ``Depends`` when fetching: :func:`fetch_packages`).

    >>> package_names("6.1.0-56-amd64")["headers_common"]
    'linux-headers-6.1.0-56-common'
    >>> package_names("6.12.117+deb13-amd64")["kbuild"]
    'linux-kbuild-6.12.117+deb13'
    """
    m = _RELEASE_RE.fullmatch(release)
    if not m:
        raise InputError(f"{release}: not a Debian kernel release (expected e.g. 6.1.0-56-amd64 or "
                         "6.12.117+deb13-amd64)")
    mm = f"{m.group(1)}.{m.group(2)}"
    flavour = m.group(6)
    abi = release[: -len(m.group(7)) - 1]
    if flavour:  # rt/cloud flavours: 6.1.0-56-rt-amd64 -> common-rt
        abi = abi[: -len(flavour) - 1]
    common = f"linux-headers-{abi}-common" + (f"-{flavour}" if flavour else "")
    kbuild = f"linux-kbuild-{mm}" if m.group(4) else f"linux-kbuild-{abi}"
    return {"image": f"linux-image-{release}", "headers": f"linux-headers-{release}",
            "headers_common": common, "kbuild": kbuild, "source": f"linux-source-{mm}"}


def release_root(release: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/distro/debian/<release>``."""
    cache_dir("distro", "debian", "debs", cache=cache)  # refused if others can write it (or a parent)
    return cache_dir("distro", "debian", release, cache=cache)


def package_version(pkg: str, root: Path | None = None) -> str:
    """Highest version of ``pkg`` in klpforge's own apt index (:mod:`.apt`); raises :class:`InputError`."""
    return apt_root(root.parents[2] if root is not None else None).newest(pkg)


def _depends_on(depends: str, prefix: str) -> str | None:
    """The first package of a ``Depends`` field starting with ``prefix`` (``linux-kbuild-``)."""
    for alt in re.split(r"[,|]", depends):
        name = alt.strip().split(" ", 1)[0]
        if name.startswith(prefix):
            return name
    return None


def package_records(release: str, cache: str | os.PathLike[str] | None = None,
                    say: Say | None = None) -> dict[str, PackageRecord]:
    """role -> the signed index's record of each package of ``release`` (no download).

    The source package is pinned to the image's version (``linux-source-6.1=6.1.192-2`` for
    ``6.1.0-56-amd64``, ``linux-source-6.12=6.12.117-1`` for ``6.12.117+deb13-amd64``); ``-common`` and
    ``linux-kbuild`` are the ones the headers package depends on (kbuild: the newest version, it only has to be
    ``>=`` the headers'). An image apt does not know lists the releases of that line that exist.
    """
    names = package_names(release)
    apt = apt_root(cache)
    have = apt.versions(names["image"], say)
    if not have:
        apt.update(say, force=True)
        have = apt.versions(names["image"], say)
    if not have:
        line = release.split("-")[0].split("+")[0].rsplit(".", 1)[0]
        r = apt.run(["apt-cache", "pkgnames", "linux-image-" + line])
        want = _RELEASE_RE.fullmatch(release)
        assert want is not None
        known = sorted({n.removeprefix("linux-image-") for n in r.stdout.split()
                        if (k := _RELEASE_RE.fullmatch(n.removeprefix("linux-image-")))
                        # `pkgnames linux-image-6.1` also lists 6.17, 6.19: keep the same x.y line
                        and k.group(1, 2, 6, 7) == want.group(1, 2, 6, 7)},
                       key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
        raise InputError(f"the Debian archive has no {names['image']}"
                         + (f"; releases of {line} it has: {', '.join(known[-12:])}" if known else ""))
    version = highest([v for v, _ in have])
    recs = {role: apt.record(names[role], version, say) for role in ("image", "headers", "source")}
    # 7.x: linux-image-<release> is a metapackage; vmlinuz, config and modules are in linux-binary-,
    # linux-base- and linux-modules-<release> of the same version
    for part in _IMAGE_PARTS:
        if f"linux-{part}-{release} " in recs["image"].depends + " ":
            recs[f"image_{part}"] = apt.record(f"linux-{part}-{release}", version, say)
    for role, prefix in (("headers_common", "linux-headers-"), ("kbuild", "linux-kbuild-")):
        pkg = _depends_on(recs["headers"].depends, prefix) or names[role]
        recs[role] = apt.record(pkg, version if role == "headers_common" else apt.newest(pkg, say), say)
    return recs


def fetch_packages(release: str, root: Path, say: Say,
                   cache: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Download (cached in ``<cache>/distro/debian/debs``) and verify the packages of ``release``.

    Returns role -> ``.deb`` path (roles of :func:`package_names`); every file, cached or new, has the
    SHA-256 of apt's signed index (:meth:`.apt.AptRoot.fetch`: a damaged one is fetched again).
    """
    recs = package_records(release, cache, say)
    apt = apt_root(cache)
    debs = root.parent / "debs"
    return {role: apt.fetch(rec, debs, say) for role, rec in recs.items()}


def _dpkg_x(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    # through proc: an unpack (or the tar below) ends with klpforge, never writes on into the cache
    r = proc.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        if "No space left on device" in r.stderr:
            raise InputError(disk_full_message(dest, f"unpacking {deb.name}"))
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
    """Point the flavour headers' ``include /usr/src/...-common/Makefile`` at the unpacked copy, and (7.x
    headers packages) their ``KBUILD_OUTPUT=/usr/src/linux-headers-<release>`` at the unpacked directory
    (the common Makefile stops with 'specified kernel directory ... does not exist' otherwise)."""
    hdr = headers_root / "usr/src" / f"linux-headers-{release}"
    mk = hdr / "Makefile"
    if not mk.is_file():
        raise InputError(f"{mk}: missing from the headers package")
    text = mk.read_text()
    fixed = re.sub(r"^include /usr/src/", f"include {headers_root}/usr/src/", text, flags=re.M)
    fixed = re.sub(r"^(KBUILD_OUTPUT\s*:?=\s*)/usr/src/", rf"\g<1>{headers_root}/usr/src/", fixed, flags=re.M)
    if fixed != text:
        mk.write_text(fixed)
    return hdr


def _stamp_debs(recs: dict[str, PackageRecord]) -> dict[str, dict[str, str]]:
    """What the stamp records of the packages a tree was made from: name, version and the SHA-256 the
    signed index gave (each file was checked against it before it was unpacked)."""
    return {role: {"package": r.package, "version": r.version, "sha256": r.sha256} for role, r in sorted(recs.items())}


def _stamp_key(recs: dict[str, PackageRecord], cc_text: str) -> dict[str, object]:
    return {"format": _FORMAT, "debs": _stamp_debs(recs), "cc": cc_text, "kcflags": KCFLAGS}


def _stamp_trusted(st: dict[str, object], release: str, cache: str | os.PathLike[str] | None) -> bool:
    """A prepared tree is reused only if its stamp names, for every package, the SHA-256 the signed index
    gives today for that package version (a tree from unverified or other input is prepared again)."""
    debs = st.get("debs")
    if st.get("format") != _FORMAT or not isinstance(debs, dict) or not set(package_names(release)) <= set(debs):
        return False
    apt = apt_root(cache)
    for d in debs.values():
        if not isinstance(d, dict) or not d.get("sha256"):
            return False
        try:
            if apt.record(str(d["package"]), str(d["version"])).sha256 != d["sha256"]:
                return False
        except InputError:
            return False
    return True


def _make_base(tree: DistroTree, cc: str) -> list[str]:
    return ["make", "-C", str(tree.src), f"O={tree.build}", "ARCH=x86_64", f"CC={cc}", f"HOSTCC={cc}",
            f"KCFLAGS={tree.kcflags or KCFLAGS}"]


def make_command(tree: DistroTree, *targets: str, jobs: int = 1) -> list[str]:
    """``make`` of ``targets`` in a prepared tree, with the flags the tree was prepared with; inside the
    release's build root when it has one (:mod:`.roots`)."""
    return in_root(tree, [*_make_base(tree, tree.extra.get("cc", "gcc")), f"-j{max(1, jobs)}", *targets])


def _image_files(root: Path, release: str) -> tuple[Path, Path]:
    """``(config, vmlinuz)`` of the unpacked image: ``boot/config-<release>`` (Debian 12, 13's 6.12) or, for
    the 7.x packages (linux-base-/linux-binary-<release>), ``usr/lib/modules/<release>/config`` and
    ``vmlinuz``, which kernel-install copies to /boot at installation."""
    boot = root / "image/boot"
    mods = root / "image/usr/lib/modules" / release
    if not (boot / f"config-{release}").is_file() and (mods / "config").is_file():
        return mods / "config", mods / "vmlinuz"
    return boot / f"config-{release}", boot / f"vmlinuz-{release}"


def _read_from(d: Path) -> list[str] | None:
    """The SHA-256 list recorded when ``d`` was unpacked (``<d>.from``), None without one."""
    try:
        got = json.loads(d.with_name(d.name + ".from").read_text())
        return got if isinstance(got, list) and d.is_dir() else None
    except (OSError, ValueError):
        return None


def _write_from(d: Path, hashes: list[str]) -> None:
    atomic_write(d.with_name(d.name + ".from"), json.dumps(hashes) + "\n")


def _discard(d: Path) -> None:
    """Remove ``d``: renamed first (instant, so nothing later takes it for valid), then deleted."""
    d.with_name(d.name + ".from").unlink(missing_ok=True)
    if d.exists():
        trash = d.with_name(f".trash-{d.name}-{os.getpid()}")
        os.replace(d, trash)
        shutil.rmtree(trash, ignore_errors=True)


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
    config, vmlinuz = _image_files(root, release)
    tree = DistroTree(src=src, build=root / "build", config=config,
                      release=release, image=root / "image",
                      headers=root / "headers/usr/src" / f"linux-headers-{release}",
                      vmlinuz=vmlinuz, kcflags=KCFLAGS, lock=lock)
    with tree_lock(lock):
        stamp = root / _STAMP
        if stamp.is_file():
            try:
                st = json.loads(stamp.read_text())
                if (tree.build / "scripts/mod/modpost").is_file() and _stamp_trusted(st, release, cache):
                    tree.extra.update(st.get("extra", {}))
                    if tree.extra.get("rustc_text"):
                        tree.kcflags = KCFLAGS_RUST
                    _fix_headers_makefile(root / "headers", release)  # idempotent; older trees lack later fixes
                    if tree.extra.get("root"):  # made again if it was removed
                        rtc = (RustToolchain(tree.extra["rustc_text"], tree.extra["bindgen_text"])
                               if tree.extra.get("rustc_text") else None)
                        build_root(tree.extra["cc_text"], cache, say, rtc)
                    return tree
            except (OSError, ValueError):
                pass
            say("the prepared tree's stamp does not match the signed index: preparing it again")
            stamp.unlink()
        recs = package_records(release, cache, say)
        image_roles = tuple(r for r in recs if r == "image" or r.startswith("image_"))
        made_from = {"image": image_roles, "headers": ("headers", "headers_common", "kbuild"), "src": ("source",)}
        for d, roles in made_from.items():  # an unpacked directory is kept only if made from these very files
            if _read_from(root / d) != [recs[r].sha256 for r in roles]:
                _discard(root / d)
        apt = apt_root(cache)
        debs = {role: apt.fetch(rec, root.parent / "debs", say) for role, rec in recs.items()}
        if not (root / "image").is_dir():
            say(f"unpacking {debs['image'].name}")
            shutil.rmtree(root / "image.tmp", ignore_errors=True)
            for role in image_roles:
                _dpkg_x(debs[role], root / "image.tmp")
            os.replace(root / "image.tmp", root / "image")
            _write_from(root / "image", [recs[r].sha256 for r in image_roles])
        tree.config, tree.vmlinuz = _image_files(root, release)
        if not tree.config.is_file():
            raise InputError(f"the image packages of {release} hold no config (boot/config-{release} or "
                             f"usr/lib/modules/{release}/config)")
        _, cc_text = compiler_for_config(tree.config)
        from ..kbuild.objtool import read_config

        # CONFIG_RUST=y (7.3.4+deb13): the root also has the config's rustc, rust-src and bindgen, else
        # olddefconfig drops CONFIG_RUST and every Rust driver
        rust_tc = rust_of_config(read_config(tree.config))
        cc, broot = root_for_config(cc_text, cache, say, rust_tc)
        tree.extra["cc_text"] = cc_text
        if rust_tc is not None:
            tree.extra.update(rustc_text=rust_tc.rustc_text, bindgen_text=rust_tc.bindgen_text)
            tree.kcflags = KCFLAGS_RUST
        if broot is not None:
            tree.extra.update(root=str(broot.path), root_suite=broot.suite)
        if not (root / "headers/usr/src" / f"linux-headers-{release}/Makefile").is_file():
            say("unpacking the headers packages")
            tmp = root / "headers.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for role in ("headers", "headers_common", "kbuild"):
                _dpkg_x(debs[role], tmp)
            shutil.rmtree(root / "headers", ignore_errors=True)
            os.replace(tmp, root / "headers")
            _write_from(root / "headers", [recs[r].sha256 for r in made_from["headers"]])
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
            proc.run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp / "tree")], check=True)
            top = next((tmp / "tree").iterdir())
            shutil.rmtree(root / "src", ignore_errors=True)
            (root / "src").mkdir()
            os.replace(top, src)
            _write_from(root / "src", [recs["source"].sha256])
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
        # built by the host's compiler: klpforge runs it on the host (capture_kallsyms, verify's initramfs)
        host_cc = cc if broot is None else (shutil.which("gcc") or shutil.which("cc") or "cc")
        run_logged([host_cc, "-O2", "-o", str(tree.build / "usr/gen_init_cpio"), str(src / "usr/gen_init_cpio.c")],
                   log)
        key = _stamp_key(recs, cc_text)
        atomic_write(stamp, json.dumps({**key, "extra": tree.extra, "prepared": time.time()}, indent=1) + "\n")
    return tree


#: Options Kconfig derives from the build host's tools that do not change generated code: without pahole
#: (``dwarves``) the BTF options drop out; BTF is debug data, not code. 7.x ``certs/Kconfig``
#: ``OPENSSL_SUPPORTS_ML_DSA`` asks the ``openssl`` command whether it has ML-DSA keys; only Kconfig reads it
#: (which signing key types it offers: 7.3.4+deb13 signs with RSA, MODULE_SIG_KEY_TYPE_RSA).
_TOOL_DERIVED = ("CONFIG_CC_VERSION_TEXT", "CONFIG_GCC_VERSION", "CONFIG_AS_VERSION", "CONFIG_LD_VERSION",
                 "CONFIG_PAHOLE_", "CONFIG_DEBUG_INFO_BTF_MODULES", "CONFIG_MODULE_ALLOW_BTF_MISMATCH",
                 "CONFIG_OPENSSL_SUPPORTS_")


def _check_config_kept(tree: DistroTree) -> None:
    """olddefconfig must keep every shipped option except the tool-derived ones (:data:`_TOOL_DERIVED`)."""
    def sets(p: Path) -> set[str]:
        return {ln for ln in p.read_text(errors="replace").splitlines()
                if ln.startswith("CONFIG_") and not ln.startswith(_TOOL_DERIVED)}
    lost = sorted(sets(tree.config) - sets(tree.build / ".config"))
    if lost:
        raise InputError(f"the shipped config does not survive olddefconfig here ({len(lost)} lines differ, "
                         f"e.g. {lost[0]}): different toolchain?")
