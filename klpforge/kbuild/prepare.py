"""Prepare a small, cached Linux test kernel to build and verify live patches against.

The tree is Debian's ``linux-source-<version>`` tarball, configured with ``make tinyconfig`` plus
the fragment in ``klpforge/data/kernel-<version>.config``, and built out of tree (``O=``) with
*plain* flags.

Why plain and not ``-ffunction-sections -fdata-sections`` for the whole tree (Linux 6.1, x86_64):
the x86 linker script only gathers ``.text.*``/``.data.*`` input sections under
``CONFIG_LD_DEAD_CODE_DATA_ELIMINATION``, which x86 cannot select, so a fully sectioned kernel
does not boot without a ``CPPFLAGS_vmlinux.lds`` override on every ``make``. ``klpforge build``
recompiles only the objects a patch touches, original and patched, with the section flags added
to the command Kbuild recorded (as kpatch-build does), so the running kernel is an ordinary one
-- the situation of a distribution kernel -- and a full build is ~25 % faster.

>>> layout = KernelLayout.default("6.1")
>>> str(layout.bzimage).endswith("arch/x86/boot/bzImage")
True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write, cache_dir, cache_root, tree_lock
from ..util.proc import run

__all__ = [
    "KernelLayout",
    "PrepareResult",
    "fragment_lines",
    "merge_fragment",
    "check_config",
    "prepare_kernel",
    "build_base_initramfs",
    "BUSYBOX",
    "is_current",
]

#: Busybox binary of Debian's ``busybox-static`` package.
BUSYBOX = Path("/bin/busybox")

_STAMP = ".klpforge-prepared.json"


@dataclass(frozen=True)
class KernelLayout:
    """Where the pieces of one prepared kernel are.

    >>> KernelLayout.default("6.1", "/c").src
    PosixPath('/c/kernel-6.1/linux-source-6.1')
    """

    version: str
    root: Path
    #: ``""`` for the default test kernel, else the name of an extra fragment (``ibt``:
    #: ``kernel-<version>-ibt.config`` on top of the default one), built in ``kernel-<version>-<variant>``
    variant: str = ""

    @classmethod
    def default(cls, version: str = "6.1", cache: str | os.PathLike[str] | None = None,
                variant: str = "") -> KernelLayout:
        """Layout under :func:`cache_root`; a variant has its own build directory and shares the default
        kernel's unpacked (never modified) source tree."""
        return cls(version, cache_dir(f"kernel-{version}{'-' + variant if variant else ''}", cache=cache), variant)

    @property
    def tarball(self) -> Path:
        """Debian's ``linux-source-<version>`` tarball: the host's (Debian 12: ``/usr/src/linux-source-6.1.tar.xz``)
        or, for a version the host does not package (7.3, trixie-backports), the one taken from the ``.deb``
        klpforge fetched itself (:func:`_fetch_tarball`) beside the unpacked source."""
        host = Path(f"/usr/src/linux-source-{self.version}.tar.xz")
        if host.is_file() or self.version == "6.1":
            return host
        return self.src.parent / host.name

    @property
    def clang(self) -> bool:
        """Built with Clang (``make LLVM=-19`` in the Clang build root): the ``clang*`` variants."""
        return self.variant.split("-")[0] == "clang"

    @property
    def src(self) -> Path:
        """Unpacked, never modified source tree (``KERNEL_SRC``); a variant uses the default kernel's."""
        base = self.root.parent / f"kernel-{self.version}" if self.variant else self.root
        return base / f"linux-source-{self.version}"

    @property
    def build(self) -> Path:
        """Out-of-tree build directory (``KERNEL_BUILD``)."""
        return self.root / "build"

    @property
    def bzimage(self) -> Path:
        """Bootable x86 image (``BZIMAGE``)."""
        return self.build / "arch/x86/boot/bzImage"

    @property
    def initramfs(self) -> Path:
        """Base busybox initramfs (uncompressed newc cpio)."""
        return self.root / "initramfs.cpio"

    @property
    def stamp(self) -> Path:
        """Build-once stamp, keyed by version, fragment, tarball and compiler."""
        return self.build / _STAMP

    @property
    def log(self) -> Path:
        """Full make log of the last prepare."""
        return self.root / "prepare.log"


@dataclass(frozen=True)
class PrepareResult:
    """What ``klpforge kernel prepare`` prints, as shell assignments."""

    layout: KernelLayout
    cached: bool
    seconds: float

    def shell(self) -> str:
        """Lines a shell can ``eval``.

        >>> PrepareResult(KernelLayout("6.1", Path("/c")), True, 0.0).shell().splitlines()[0]
        'KERNEL_SRC=/c/linux-source-6.1'
        """
        lay = self.layout
        return (f"KERNEL_SRC={lay.src}\nKERNEL_BUILD={lay.build}\nBZIMAGE={lay.bzimage}\n"
                f"INITRAMFS={lay.initramfs}\n")


def fragment_text(version: str, variant: str = "") -> str:
    """The config fragment bundled for ``version``, followed by the variant's own lines (which win)."""
    try:
        text = (resources.files("klpforge") / "data" / f"kernel-{version}.config").read_text()
    except FileNotFoundError:
        raise InputError(f"no config fragment for kernel {version} (6.1, and 7.3 with --toolchain clang)") from None
    # a variant is one fragment per dash-separated part: clang-thin-cfi = -clang, -thin and -cfi on top
    for part in variant.split("-") if variant else ():
        try:
            text += (resources.files("klpforge") / "data" / f"kernel-{version}-{part}.config").read_text()
        except FileNotFoundError:
            raise InputError(f"no config fragment for the {variant} variant of kernel {version}") from None
    return text


def fragment_lines(text: str) -> dict[str, str]:
    """Map ``CONFIG_X`` to its wanted line (``CONFIG_X=y`` or ``# CONFIG_X is not set``).

    >>> fragment_lines("CONFIG_A=y  # why\\n# CONFIG_B is not set\\n# comment\\n")
    {'CONFIG_A': 'CONFIG_A=y', 'CONFIG_B': '# CONFIG_B is not set'}
    """
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line.split()[1]] = line
        elif line.startswith("CONFIG_"):
            line = line.split("#", 1)[0].strip()
            out[line.split("=", 1)[0]] = line
    return out


def merge_fragment(config: str, wanted: dict[str, str]) -> str:
    """Return ``config`` (a ``.config`` text) with every symbol of ``wanted`` set as asked.

    >>> merge_fragment("CONFIG_A=y\\n# CONFIG_B is not set\\n", {"CONFIG_B": "CONFIG_B=m"})
    'CONFIG_A=y\\nCONFIG_B=m\\n'
    """
    keep = []
    for line in config.splitlines():
        sym = _config_symbol(line)
        if sym is None or sym not in wanted:
            keep.append(line)
    keep.extend(wanted.values())
    return "\n".join(keep) + "\n"


def _config_symbol(line: str) -> str | None:
    if line.startswith("CONFIG_"):
        return line.split("=", 1)[0]
    if line.startswith("# CONFIG_") and line.endswith(" is not set"):
        return line.split()[1]
    return None


def check_config(config: str, wanted: dict[str, str]) -> list[str]:
    """Fragment lines that did not land in ``config`` (a dependency dropped them).

    A wanted ``# CONFIG_X is not set`` is also satisfied by the symbol being absent.

    >>> check_config("CONFIG_A=y\\n", {"CONFIG_A": "CONFIG_A=y", "CONFIG_B": "CONFIG_B=y"})
    ['CONFIG_B=y']
    """
    have: dict[str, str] = {}
    for line in config.splitlines():
        sym = _config_symbol(line)
        if sym:
            have[sym] = line
    missing = []
    for sym, line in wanted.items():
        if line.startswith("#"):
            if have.get(sym, line) != line:
                missing.append(line)
        elif have.get(sym) != line:
            missing.append(line)
    return missing


def _stamp_key(layout: KernelLayout, fragment: str, cc_text: str | None = None) -> dict[str, str]:
    st = layout.tarball.stat()
    gcc = cc_text if cc_text is not None else \
        subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "version": layout.version + (f"-{layout.variant}" if layout.variant else ""),
        "fragment_sha256": hashlib.sha256(fragment.encode()).hexdigest(),
        "tarball": f"{layout.tarball}:{st.st_size}:{int(st.st_mtime)}",
        "gcc": gcc.splitlines()[0] if gcc else "unknown",
    }


def is_current(layout: KernelLayout) -> bool:
    """True when ``layout`` was prepared with today's fragment, tarball and gcc (its stamp's key matches):
    a kernel prepared before the fragment changed (say, before ``CONFIG_JUMP_LABEL`` was added) is not."""
    try:
        st = json.loads(layout.stamp.read_text())
        cc = st.get("key", {}).get("gcc") if layout.clang else None  # the root's clang: checked at build
        return bool(st.get("key") == _stamp_key(layout, fragment_text(layout.version, layout.variant), cc))
    except (OSError, ValueError, InputError):
        return False


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        r = run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)  # own group: ended with klpforge
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise InputError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); see {log}: "
                         + " | ".join(t.strip() for t in tail if t.strip())[-600:])


def _unpack(layout: KernelLayout) -> None:
    if not layout.tarball.is_file():
        raise InputError(f"{layout.tarball} not found: "
                         f"install Debian's linux-source-{layout.version} package")
    tmp = layout.src.parent / f".unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # `tar` is several times faster than tarfile on this 1.4 GB tree.
        if shutil.which("tar"):
            r = run(["tar", "-xJf", str(layout.tarball), "-C", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                raise InputError(f"unpacking {layout.tarball} failed: {r.stderr.strip()[-300:]}")
        else:  # pragma: no cover
            with tarfile.open(layout.tarball) as tf:
                tf.extractall(tmp, filter="data")
        os.replace(tmp / layout.src.name, layout.src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_tarball(layout: KernelLayout, say: Callable[[str], None]) -> None:
    """Fetch Debian's newest ``linux-source-<version>`` with klpforge's own apt configuration (verified
    against the signed index, :mod:`klpforge.distro.apt`) and take its tarball out to ``layout.tarball``.

    7.3 is ``linux-source-7.3=7.3.4-1~bpo13+1`` (trixie-backports, 167 MB)."""
    from ..distro.apt import apt_root  # distro imports kbuild: resolved at call time

    cache = layout.root.parent
    apt = apt_root(cache)
    pkg = f"linux-source-{layout.version}"
    rec = apt.record(pkg, apt.newest(pkg, say), say)
    deb = apt.fetch(rec, cache / "distro" / "debian" / "debs", say)
    tmp = layout.tarball.parent / f".deb-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        r = run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
        if r.returncode != 0:
            raise InputError(f"{deb.name}: dpkg-deb failed: {r.stderr.decode(errors='replace').strip()[-300:]}")
        tmp.mkdir(parents=True)
        (tmp / "data.tar").write_bytes(r.stdout)
        inner = f"./usr/src/{layout.tarball.name}"
        r2 = run(["tar", "-xf", str(tmp / "data.tar"), "-C", str(tmp), inner], capture_output=True, text=True)
        if r2.returncode != 0:
            raise InputError(f"{deb.name} holds no {inner}: {r2.stderr.strip()[-300:]}")
        os.replace(tmp / inner, layout.tarball)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_base_initramfs(layout: KernelLayout) -> Path:
    """Build ``layout.initramfs``: busybox, ``/dev/console`` and an ``/init`` that reports and reboots.

    ``klpforge verify`` builds its own initramfs per run from the same pieces
    (see :mod:`klpforge.qemu.initramfs`).
    """
    # local import: klpforge.qemu imports klpforge.kbuild, not the reverse at import time
    from ..qemu.initramfs import build_initramfs

    init = ("#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n"
            "echo klpforge initramfs up\n/bin/busybox reboot -f\n")
    build_initramfs(layout.build / "usr/gen_init_cpio", layout.initramfs, init, {})
    return layout.initramfs


def prepare_kernel(layout: KernelLayout, jobs: int | None = None, force: bool = False,
                   progress: Callable[[str], None] | None = None) -> PrepareResult:
    """Unpack, configure and build the test kernel once; later calls return at once.

    One prepare per kernel version at a time (an ``flock`` on ``<cache>/.kernel-<version>.lock``): the
    variants share the unpacked source, and two ``make`` runs in one build directory break each other's
    objects. A second caller waits, then finds the kernel made.

    >>> res = prepare_kernel(KernelLayout.default("6.1"))   # doctest: +SKIP
    >>> print(res.shell())                                   # doctest: +SKIP
    """
    with tree_lock(layout.root.parent / f".kernel-{layout.version}.lock"):
        return _prepare_kernel(layout, jobs, force, progress)


def _prepare_kernel(layout: KernelLayout, jobs: int | None, force: bool,
                    progress: Callable[[str], None] | None) -> PrepareResult:
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    fragment = fragment_text(layout.version, layout.variant)
    root = None
    if layout.clang:
        from .clang import clang_root_for  # the Clang build root (distro.roots), made once

        root = clang_root_for("", None if layout.root.parent == cache_root() else layout.root.parent, say)
    if not layout.tarball.is_file() and layout.tarball.parent != Path("/usr/src"):
        _fetch_tarball(layout, say)
    if not layout.tarball.is_file():
        raise InputError(f"{layout.tarball} not found: "
                         f"install Debian's linux-source-{layout.version} package")
    key = _stamp_key(layout, fragment, root.cc_text if root is not None else None)  # type: ignore[attr-defined]
    if not force and layout.stamp.is_file() and layout.bzimage.is_file():
        try:
            if json.loads(layout.stamp.read_text()).get("key") == key:
                if not layout.initramfs.is_file():
                    build_base_initramfs(layout)
                return PrepareResult(layout, True, time.monotonic() - t0)
        except (OSError, ValueError):
            pass
    if not BUSYBOX.is_file():
        raise InputError(f"{BUSYBOX} not found: install Debian's busybox-static package")
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.log.write_text("")
    if not (layout.src / "Makefile").is_file():
        say(f"unpacking {layout.tarball.name}")
        layout.src.parent.mkdir(parents=True, exist_ok=True)
        _unpack(layout)
    layout.build.mkdir(exist_ok=True)
    layout.stamp.unlink(missing_ok=True)
    make = ["make", "-C", str(layout.src), f"O={layout.build}", "ARCH=x86_64"]
    if root is not None:  # make and every tool it runs inside the root, the trees bound at their paths
        from .clang import LLVM_SUFFIX, root_binds

        make = root.wrap([*make, f"LLVM={LLVM_SUFFIX}"], root_binds(layout.src, layout.root))  # type: ignore[attr-defined]
    say("make tinyconfig + fragment")
    _run([*make, "tinyconfig"], layout.log)
    wanted = fragment_lines(fragment)
    cfg = layout.build / ".config"
    atomic_write(cfg, merge_fragment(cfg.read_text(), wanted))
    _run([*make, "olddefconfig"], layout.log)
    missing = check_config(cfg.read_text(), wanted)
    if missing:
        raise InputError(f"config lines dropped by Kconfig dependencies: {', '.join(missing)}")
    n = jobs or os.cpu_count() or 1
    say(f"building the kernel with -j{n} (about {'20' if root is not None else '4-5'} min on 2 cores; "
        f"log: {layout.log})")
    _run([*make, f"-j{n}"], layout.log)
    for need in (layout.bzimage, layout.build / "vmlinux", layout.build / "usr/gen_init_cpio"):
        if not need.is_file():
            raise InputError(f"the build did not produce {need}; see {layout.log}")
    if root is not None:
        # klpforge runs gen_init_cpio on the host (verify's initramfs): the root's links against trixie's libc
        cc = shutil.which("gcc") or shutil.which("cc") or "cc"
        host_tool = layout.root / "host-gen_init_cpio"
        _run([cc, "-O2", "-o", str(host_tool), str(layout.src / "usr/gen_init_cpio.c")], layout.log)
        os.replace(host_tool, layout.build / "usr/gen_init_cpio")
    say("initramfs")
    build_base_initramfs(layout)
    atomic_write(layout.stamp, json.dumps({"key": key, "built": time.time()}, indent=1) + "\n")
    return PrepareResult(layout, False, time.monotonic() - t0)
