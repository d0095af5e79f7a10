"""Per-release build roots: each kernel compiled by the exact compiler its config names.

A Debian kernel's ``CONFIG_CC_VERSION_TEXT`` names its compiler and the Debian version of it
(``x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0`` for 6.12.117+deb13 and 7.3.4+deb13,
``gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`` for 6.1.0-56). When the host's compiler prints exactly that
line it is used directly (6.1 on a Debian 12 host). Otherwise :func:`build_root` makes a root file system of
the Debian suite that ships that compiler version (``apt-cache madison gcc-14`` in klpforge's own index:
trixie) with ``mmdebstrap`` from the same archive and keyring (:mod:`.apt`; apt inside mmdebstrap verifies
every package against the signed index), once per suite under ``<cache>/roots/<suite>-amd64/``, never
written after it was made (entered read-only).

Entering a root: :meth:`BuildRoot.wrap` runs a command under ``bwrap`` (bubblewrap) with the root as ``/``
read-only, ``/dev``, ``/proc``, ``/tmp`` and the release's cache directory bound at their own paths (Kbuild's
``.cmd`` files record absolute paths), no network, ended with its parent. As a normal user ``bwrap`` needs
no privilege (an unprivileged user namespace; Debian enables them); as root it simply mounts. ``mmdebstrap``
runs in ``root`` mode as root and in ``unshare`` mode as a normal user (``--mode=auto``; the latter needs
``/etc/subuid`` ranges).

>>> compiler_package("x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0")
('x86_64-linux-gnu-gcc-14', 'gcc-14', '14.2.0-19')
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..util import proc
from ..util.errors import InputError
from ..util.fsutil import atomic_write, cache_root, check_private_dir, tree_lock
from .apt import KEYRING, SUITES, apt_root, disk_full_message, mirrors
from .base import DistroTree, Say

__all__ = ["BuildRoot", "ROOT_PACKAGES", "RustToolchain", "rust_of_config", "compiler_package", "host_matches",
           "build_root", "root_for_config", "tree_root", "in_root", "tools_on_path"]

#: What a kernel's ``make prepare modules_prepare``, single-object builds and external-module links need
#: (besides the compiler): Kbuild's host tools (bison, flex, libelf for objtool, libssl for sign-file),
#: ``pahole`` for BTF (the configs set ``CONFIG_DEBUG_INFO_BTF``), the compressors of ``.ko.xz``/``.ko.zst``,
#: python3 (6.12 ``tools/lib/bpf`` generates ``bpf_helper_defs.h`` with it for resolve_btfids).
ROOT_PACKAGES = ("make", "libc6-dev", "binutils", "bc", "bison", "flex", "libelf-dev", "libssl-dev", "kmod",
                 "cpio", "perl", "xz-utils", "zstd", "dwarves", "python3")

_FORMAT = 1


@dataclass(frozen=True)
class RustToolchain:
    """The Rust toolchain a ``CONFIG_RUST=y`` config names: the first lines of ``rustc --version``
    (``CONFIG_RUSTC_VERSION_TEXT``) and ``bindgen --version`` (``CONFIG_BINDGEN_VERSION_TEXT``), as the
    distribution's build printed them (7.3.4+deb13: ``rustc 1.85.1 (4eb161250 2025-03-15) (built from a source
    tarball)``, ``bindgen 0.71.1``)."""

    rustc_text: str
    bindgen_text: str

    def versions(self) -> tuple[str, str]:
        """Upstream versions ``(rustc, bindgen)``: ``('1.85.1', '0.71.1')``."""
        return self.rustc_text.split()[1], self.bindgen_text.split()[1]


def rust_of_config(config: dict[str, str]) -> RustToolchain | None:
    """The :class:`RustToolchain` of a config (``CONFIG_X`` -> value as written), None without ``CONFIG_RUST=y``.
    Kconfig keeps ``CONFIG_RUST`` only when ``scripts/rust_is_available.sh`` accepts the tools it finds, so a
    build root without them drops it and every Rust driver (Linux 6.12+ ``init/Kconfig`` ``RUST_IS_AVAILABLE``).

    >>> rust_of_config({"CONFIG_RUST": "y", "CONFIG_RUSTC_VERSION_TEXT": '"rustc 1.85.1 (4eb161250 2025-03-15)"',
    ...                 "CONFIG_BINDGEN_VERSION_TEXT": '"bindgen 0.71.1"'}).versions()
    ('1.85.1', '0.71.1')
    """
    if config.get("CONFIG_RUST") != "y":
        return None
    rustc, bindgen = (config.get(k, "").strip('"')
                      for k in ("CONFIG_RUSTC_VERSION_TEXT", "CONFIG_BINDGEN_VERSION_TEXT"))
    if not re.match(r"rustc \d", rustc) or not re.match(r"bindgen \d", bindgen):
        raise InputError(f"the config has CONFIG_RUST=y but names no rustc/bindgen version "
                         f"(CONFIG_RUSTC_VERSION_TEXT={rustc!r}, CONFIG_BINDGEN_VERSION_TEXT={bindgen!r})")
    return RustToolchain(rustc, bindgen)


def _rust_packages(rust: RustToolchain, suite: str, cache: str | os.PathLike[str] | None,
                   say: Say | None) -> tuple[list[str], list[str]]:
    """``pkg=version`` of ``rustc``, ``rust-src`` (the kernel builds ``core`` from it) and ``bindgen`` whose
    upstream versions are the config's, from ``suite`` (the compiler's suite) when it has them, else the
    first suite of klpforge's index that does: trixie has rustc 1.85.1+dfsg1-1+deb13u1 and bindgen 0.71.1-6,
    the ones 7.3.4+deb13's config names. Returns the packages and the other suites they come from.
    Raises :class:`InputError` naming what the archive lacks."""
    apt = apt_root(cache)
    rustc_v, bindgen_v = rust.versions()
    out: list[str] = []
    suites: list[str] = []
    for pkg, up in (("rustc", rustc_v), ("rust-src", rustc_v), ("bindgen", bindgen_v)):
        have = apt.versions(pkg, say)
        # Debian version = [epoch:]upstream[+dfsgN][-revision][~bpo...]: the upstream part must match exactly
        match = [(v, s) for v, s in have if re.fullmatch(re.escape(up) + r"([+~-].*)?", v.split(":", 1)[-1])]
        if not match:
            listed = ", ".join(f"{v} ({s})" for v, s in have) or "none"
            raise InputError(f"the kernel was built with {pkg} {up} (CONFIG_RUST=y), which the Debian archive does "
                             f"not serve (it has: {listed}): cannot make its build root")
        v, s = next(((v, s) for v, s in match if s == suite), match[0])
        out.append(f"{pkg}={v}")
        if s != suite and s not in suites:
            suites.append(s)
    return out, suites


def compiler_package(cc_text: str) -> tuple[str, str, str]:
    """``(command, Debian package, Debian version)`` of a ``CONFIG_CC_VERSION_TEXT``.

    Raises :class:`InputError` when the text names no Debian GCC (clang, a self-built gcc).
    """
    m = re.fullmatch(r"(\S+) \(Debian ([^)]+)\) \S+", cc_text.strip())
    if not m:
        raise InputError(f"compiler '{cc_text}' is not a Debian GCC: cannot make a build root for it")
    cmd = m.group(1)
    pkg = re.sub(r"^[a-z0-9_]+-linux-gnu-", "", cmd)
    if not re.fullmatch(r"gcc-\d+", pkg):
        raise InputError(f"compiler '{cc_text}': cannot tell its Debian package from {cmd!r}")
    return cmd, pkg, m.group(2)


def host_matches(cc_text: str) -> str | None:
    """The host's compiler command when it prints exactly ``cc_text`` (first line of ``--version``)."""
    cmd = cc_text.split()[0] if cc_text.split() else ""
    exe = shutil.which(cmd)
    if exe is None:
        return None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return cmd if (r.stdout.splitlines() or [""])[0].strip() == cc_text else None


@dataclass(frozen=True)
class BuildRoot:
    """A made root file system (``path``) of ``suite`` whose compiler prints ``cc_text``."""

    suite: str
    path: Path
    cc_text: str

    def wrap(self, argv: list[str], binds: list[Path], cwd: Path | None = None) -> list[str]:
        """``argv`` run inside the root with ``binds`` (and ``/tmp``) writable at their own paths."""
        bw = shutil.which("bwrap")
        if bw is None:
            raise InputError("bwrap (package bubblewrap) is needed to enter the build root "
                             f"{self.path}; install it")
        # bwrap's new / is an empty tmpfs: the root's top-level directories are bound into it read-only
        # (its usr-merged symlinks recreated), then the writable paths at their own names, then / read-only
        cmd = [bw]
        # a top-level directory that holds a bound path (the cache under /root or /home) is left out: bwrap
        # must create the bind's parents, which it cannot inside a read-only bind of the root's own directory
        holders = {Path(b).resolve().parts[1] for b in binds if len(Path(b).resolve().parts) > 1}
        for top in sorted(self.path.iterdir()):
            if top.name in ("dev", "proc", "tmp", "sys"):
                continue
            if top.name in holders:
                if top.name in ("usr", "etc", "bin", "sbin", "lib", "lib64", "var"):
                    raise InputError(f"the klpforge cache under /{top.name} cannot be seen from the build root "
                                     f"{self.path}: set KLPFORGE_CACHE to a directory elsewhere")
                continue
            if top.is_symlink():
                cmd += ["--symlink", os.readlink(top), f"/{top.name}"]
            elif top.is_dir():
                cmd += ["--ro-bind", str(top), f"/{top.name}"]
        cmd += ["--dev", "/dev", "--proc", "/proc", "--bind", "/tmp", "/tmp"]
        bound: list[str] = ["/tmp"]
        for b in sorted({str(Path(b).resolve()) for b in binds}, key=len):
            if not any(b == x or b.startswith(x.rstrip("/") + "/") for x in bound):
                bound.append(b)
                cmd += ["--bind", b, b]
        cmd += ["--remount-ro", "/", "--unshare-net", "--die-with-parent",
                "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "LC_ALL", "C.UTF-8"]
        if cwd is not None:
            cmd += ["--chdir", str(Path(cwd).resolve())]
        return [*cmd, *argv]


def _suite_of(pkg: str, version: str, cache: str | os.PathLike[str] | None, say: Say | None) -> str:
    apt = apt_root(cache)
    have = apt.versions(pkg, say)
    suites = [s for v, s in have if v == version]
    if not suites:
        listed = ", ".join(f"{v} ({s})" for v, s in have) or "none"
        raise InputError(f"the kernel was built with {pkg} {version}, which the Debian archive no longer "
                         f"serves (it has: {listed}): cannot make its build root")
    known = [s.name for s in SUITES]
    # the release itself before its updates/security/backports: the compiler the release shipped
    return sorted(suites, key=lambda s: ("-" in s, known.index(s) if s in known else 99))[0]


def build_root(cc_text: str, cache: str | os.PathLike[str] | None = None, say: Say | None = None,
               rust: RustToolchain | None = None) -> BuildRoot:
    """The build root whose compiler prints ``cc_text``, made on first use (about 2-3 minutes, 420 MB).
    With ``rust`` (a ``CONFIG_RUST=y`` config) a separate root of the same suite that also has the config's
    ``rustc``, ``rust-src`` and ``bindgen`` (:func:`_rust_packages`; ``<suite>-rust<version>-amd64``, about
    1.7 GB and 4-6 minutes once), their ``--version`` lines checked against the config's; the root without
    Rust (6.12) is another directory and stays as it is.

    Raises :class:`InputError`: compiler or Rust tools not in the archive, ``mmdebstrap`` missing or failing,
    the made root's tools printing another line, out of disk space.
    """
    cmd, pkg, version = compiler_package(cc_text)
    suite = _suite_of(pkg, version, cache, say)
    base = cache_root(cache) / "roots"
    # the directories above and the roots' parent only: a root holds its own /tmp (1777, sticky) by design
    check_private_dir(base, walk=False)
    base.mkdir(parents=True, exist_ok=True)
    name = suite if rust is None else f"{suite}-rust{rust.versions()[0]}"
    extra, more_suites = ([], []) if rust is None else _rust_packages(rust, suite, cache, say)
    packages = [f"{pkg}={version}", *ROOT_PACKAGES, *extra]
    path = base / f"{name}-amd64"
    stamp = base / f"{name}-amd64.json"
    root = BuildRoot(suite, path, cc_text)
    with tree_lock(base / f".{name}.lock"):
        try:
            st = json.loads(stamp.read_text())
            if st.get("format") == _FORMAT and cc_text in st.get("compilers", []) and path.is_dir() and \
                    st.get("packages") == packages:
                return root
        except (OSError, ValueError):
            pass
        mm = shutil.which("mmdebstrap")
        if mm is None:
            raise InputError(f"the kernel was built with '{cc_text}' (Debian {suite}); making its build root "
                             "needs mmdebstrap (install mmdebstrap and bubblewrap)")
        mirror = mirrors()[next((s.archive for s in SUITES if s.name == suite), "debian")]
        more = [f"deb [signed-by={KEYRING}] {mirrors()[next((s.archive for s in SUITES if s.name == m), 'debian')]} "
                f"{m} main" for m in more_suites]
        tmp = base / f".{name}-amd64.new"
        shutil.rmtree(tmp, ignore_errors=True)
        log = base / f"{name}-amd64.log"
        if say:
            with_rust = "" if rust is None else f" and '{rust.rustc_text}'"
            say(f"making the {name} build root for '{cc_text}'{with_rust} with mmdebstrap (once; log: {log})")
        include = ",".join(packages)
        argv = [mm, "--variant=apt", "--mode=auto", f"--include={include}",
                "--aptopt=Acquire::Languages \"none\"", "--architectures=amd64",
                suite, str(tmp), f"deb [signed-by={KEYRING}] {mirror} {suite} main", *more]
        t0 = time.time()
        with log.open("w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            # through proc: mmdebstrap (apt, dpkg as root) ends with klpforge (issue 17 item 4)
            r = proc.run(argv, stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace")
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if "No space left on device" in text:
                raise InputError(disk_full_message(base, f"making the {suite} build root"))
            errs = [ln for ln in text.splitlines() if ln.startswith("E:")]
            raise InputError(f"mmdebstrap {suite} failed (see {log}): {(errs or text.splitlines() or ['?'])[-1]}")
        made = BuildRoot(suite, tmp, cc_text)
        wanted = [(cmd, cc_text)] + ([] if rust is None else [("rustc", rust.rustc_text),
                                                               ("bindgen", rust.bindgen_text)])
        for tool, text in wanted:
            v = subprocess.run(made.wrap([tool, "--version"], []), capture_output=True, text=True, check=False)
            got = (v.stdout.splitlines() or [v.stderr.strip()])[0].strip()
            if got != text:
                shutil.rmtree(tmp, ignore_errors=True)
                raise InputError(f"the {name} build root's {tool} prints '{got}', the kernel's config says "
                                 f"'{text}'")
        if path.exists():  # an older root (other package list): renamed away first, then removed
            old = base / f".{name}-amd64.old.{os.getpid()}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
            os.chmod(path, 0o555)  # read-only after: entered with --ro-bind, never written
            atomic_write(stamp, json.dumps({"format": _FORMAT, "suite": suite, "compilers": [cc_text],
                                            "packages": packages,
                                            "seconds": round(time.time() - t0, 1), "made": time.ctime()},
                                           indent=1) + "\n")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(disk_full_message(base, f"making the {suite} build root")) from None
            raise
    return root


def root_for_config(cc_text: str, cache: str | os.PathLike[str] | None = None,
                    say: Say | None = None, rust: RustToolchain | None = None) -> tuple[str, BuildRoot | None]:
    """``(compiler command, root or None)``: the host's compiler when it prints ``cc_text`` exactly (and the
    config needs no Rust), else the command inside :func:`build_root`."""
    host = host_matches(cc_text) if rust is None else None
    if host is not None:
        return host, None
    root = build_root(cc_text, cache, say, rust)
    return compiler_package(cc_text)[0], root


def tree_root(tree: DistroTree) -> BuildRoot | None:
    """The build root a prepared tree was made in (``tree.extra["root"]``), or None (host compiler)."""
    path = tree.extra.get("root")
    if not path:
        return None
    return BuildRoot(tree.extra.get("root_suite", ""), Path(path), tree.extra.get("cc_text", ""))


def _binds(tree: DistroTree) -> list[Path]:
    # the release's cache directory (source, build, headers) and the temporary directory of the build
    return [tree.build.parent, tree.src, tree.build, Path(tempfile.gettempdir())]


def in_root(tree: DistroTree, argv: list[str], cwd: Path | None = None) -> list[str]:
    """``argv`` to run in ``tree``'s build root, or ``argv`` itself when the host compiler is used."""
    root = tree_root(tree)
    return argv if root is None else root.wrap(argv, _binds(tree), cwd)


@contextmanager
def tools_on_path(tree: DistroTree) -> Iterator[None]:
    """For code that runs ``make`` or the compiler by name (the module link of
    :func:`klpforge.kbuild.module.build_module`, the struct-size probe): while inside, ``PATH`` starts with
    a directory whose ``make`` and compiler enter ``tree``'s build root (``cwd`` kept). No-op without a root."""
    root = tree_root(tree)
    if root is None:
        yield
        return
    cmd = compiler_package(root.cc_text)[0] if root.cc_text else "gcc"
    with tempfile.TemporaryDirectory(prefix="klpforge-root-bin-") as td:
        # the caller's directory when the root sees it (make -C / M= name the rest), else /
        seen = sorted({str(Path(b).resolve()) for b in _binds(tree)} | {"/tmp"})
        case = "|".join(f"{shlex.quote(b)}|{shlex.quote(b)}/*" for b in seen)
        for tool in ("make", cmd):
            wrapped = root.wrap([tool], _binds(tree))
            script = Path(td) / tool
            script.write_text("#!/bin/sh\n# klpforge: run in the build root " + str(root.path) + "\n"
                              + f'case "$PWD" in {case}) d="$PWD" ;; *) d=/ ;; esac\n'
                              + "exec " + " ".join(shlex.quote(a) for a in wrapped[:-1])
                              + ' --chdir "$d" ' + shlex.quote(tool) + ' "$@"\n')
            script.chmod(0o755)
        old = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{td}:{old}"
        try:
            yield
        finally:
            os.environ["PATH"] = old


#: The LLVM toolchain of a Clang-built kernel (``make LLVM=-19``: clang-19, ld.lld-19, llvm-ar-19, llvm-nm-19,
#: llvm-objcopy-19 ...), Debian 13's, on top of :data:`ROOT_PACKAGES`; ``gcc`` stays for host programs that
#: Kbuild builds with ``HOSTCC`` (``clang`` too under ``LLVM=``, but libelf headers come from libc6-dev either way).
CLANG_PACKAGES = ("clang-19", "lld-19", "llvm-19", "gcc")


def clang_root(cache: str | os.PathLike[str] | None = None, say: Say | None = None,
               suite: str = "trixie") -> BuildRoot:
    """The ``<suite>-clang-amd64`` build root (Clang/LLD/LLVM 19, Debian 13), made on first use (about 1-2
    minutes, ~900 MB) beside the GCC roots of :func:`build_root`, which it never touches; its ``cc_text`` is
    the first line ``clang-19 --version`` prints there (``Debian clang version 19.1.7 (3+b1)``).

    Raises :class:`InputError` as :func:`build_root` does.
    """
    base = cache_root(cache) / "roots"
    check_private_dir(base, walk=False)
    base.mkdir(parents=True, exist_ok=True)
    name = f"{suite}-clang-amd64"
    path, stamp, log = base / name, base / f"{name}.json", base / f"{name}.log"
    wanted = [*CLANG_PACKAGES, *ROOT_PACKAGES]
    with tree_lock(base / f".{suite}-clang.lock"):
        try:
            st = json.loads(stamp.read_text())
            if st.get("format") == _FORMAT and st.get("packages") == wanted and path.is_dir():
                return BuildRoot(suite, path, st["compilers"][0])
        except (OSError, ValueError, KeyError, IndexError):
            pass
        mm = shutil.which("mmdebstrap")
        if mm is None:
            raise InputError("a Clang kernel is built in a Debian build root made with mmdebstrap "
                             "(install mmdebstrap and bubblewrap)")
        mirror = mirrors()[next((s.archive for s in SUITES if s.name == suite), "debian")]
        tmp = base / f".{name}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        if say:
            say(f"making the {suite} Clang 19 build root with mmdebstrap (once; log: {log})")
        argv = [mm, "--variant=apt", "--mode=auto", f"--include={','.join(wanted)}",
                "--aptopt=Acquire::Languages \"none\"", "--architectures=amd64",
                suite, str(tmp), f"deb [signed-by={KEYRING}] {mirror} {suite} main"]
        t0 = time.time()
        with log.open("w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            r = proc.run(argv, stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace")
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if "No space left on device" in text:
                raise InputError(disk_full_message(base, f"making the {suite} Clang build root"))
            errs = [ln for ln in text.splitlines() if ln.startswith("E:")]
            raise InputError(f"mmdebstrap {suite} (Clang) failed (see {log}): "
                             f"{(errs or text.splitlines() or ['?'])[-1]}")
        v = subprocess.run(BuildRoot(suite, tmp, "").wrap(["clang-19", "--version"], []),
                           capture_output=True, text=True, check=False)
        cc_text = (v.stdout.splitlines() or [""])[0].strip()
        if "clang version 19." not in cc_text:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"the {suite} Clang build root's clang-19 prints '{cc_text or v.stderr.strip()}'")
        if path.exists():
            old = base / f".{name}.old.{os.getpid()}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
        os.chmod(path, 0o555)
        atomic_write(stamp, json.dumps({"format": _FORMAT, "suite": suite, "compilers": [cc_text],
                                        "packages": wanted, "seconds": round(time.time() - t0, 1),
                                        "made": time.ctime()}, indent=1) + "\n")
    return BuildRoot(suite, path, cc_text)


__all__ += ["CLANG_PACKAGES", "clang_root"]
