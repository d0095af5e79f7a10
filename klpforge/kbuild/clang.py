"""Clang, ThinLTO and kCFI kernels: the toolchain a tree was built with, read from its ``.config``, and the
build root that runs it.

A Clang kernel is built with ``make LLVM=-19`` (clang-19, ld.lld-19, llvm-ar-19, llvm-nm-19 ...) inside the
trixie Clang build root (:func:`klpforge.distro.roots.clang_root`): Debian 12 hosts have no clang 19, and the
root's compiler is the exact one the tree recorded (``CONFIG_CC_VERSION_TEXT``).

What ``.config`` says (Linux 7.3, ``arch/Kconfig``, ``init/Kconfig``):

* ``CONFIG_CC_IS_CLANG=y``: Clang; ``CONFIG_CLANG_VERSION=190107``;
* ``CONFIG_LTO_CLANG_THIN_DIST=y``: ThinLTO in distributed mode -- the compile writes bitcode ``X.o``, an
  index-only link of vmlinux writes ``X.o.thinlto.bc`` per object (``scripts/Makefile.vmlinux_a``), a backend
  compile per object turns ``X.o`` into native ``X.thinlto-native.o`` (``scripts/Makefile.thinlto``, flags from
  the ``saved_c_flags_X.o`` line of ``.X.o.cmd``); these native objects are what klpforge diffs;
* ``CONFIG_LTO_CLANG_THIN=y``: in-process ThinLTO inside ``ld.lld`` (no per-object native code exists on disk);
  ``CONFIG_LTO_CLANG_FULL=y``: one LTO module for all of vmlinux. Both are refused with the reason
  (:func:`check_supported`);
* ``CONFIG_CFI=y`` (7.3; ``CONFIG_CFI_CLANG`` before): kCFI, a ``__cfi_<fn>`` preamble holding the type hash.

>>> Toolchain.from_config({"CONFIG_CC_IS_CLANG": "y", "CONFIG_LTO_CLANG_THIN_DIST": "y", "CONFIG_CFI": "y"})
Toolchain(cc='clang', lto='thin-dist', cfi=True)
>>> Toolchain("clang", "thin-dist", True).variant
'clang-thin-cfi'
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["Toolchain", "LLVM_SUFFIX", "check_supported", "variant_for", "clang_root_for",
           "root_binds", "wrap_shell", "tools_in_root", "LLVM_TOOLS", "RootRunner"]

#: What Kbuild runs by name under ``LLVM=-19`` (plus ``make`` itself): wrapped to run in the Clang root.
LLVM_TOOLS = ("make", "clang-19", "ld.lld-19", "llvm-ar-19", "llvm-nm-19", "llvm-objcopy-19", "llvm-objdump-19",
              "llvm-readelf-19", "llvm-strip-19", "llvm-ranlib-19")

#: ``make LLVM=-19``: every LLVM tool with that suffix (``Documentation/kbuild/llvm.rst``).
LLVM_SUFFIX = "-19"


@dataclass(frozen=True)
class Toolchain:
    """How a kernel is compiled: ``cc`` (``gcc``/``clang``), ``lto`` (``none``, ``thin-dist``, ``thin``,
    ``full``), ``cfi`` (kCFI)."""

    cc: str = "gcc"
    lto: str = "none"
    cfi: bool = False

    @classmethod
    def from_config(cls, config: dict[str, str]) -> Toolchain:
        """From ``.config`` assignments (``CONFIG_X`` -> value, set symbols only)."""
        cc = "clang" if config.get("CONFIG_CC_IS_CLANG") == "y" else "gcc"
        lto = ("thin-dist" if config.get("CONFIG_LTO_CLANG_THIN_DIST") == "y"
               else "thin" if config.get("CONFIG_LTO_CLANG_THIN") == "y"
               else "full" if config.get("CONFIG_LTO_CLANG_FULL") == "y" else "none")
        cfi = config.get("CONFIG_CFI") == "y" or config.get("CONFIG_CFI_CLANG") == "y"
        return cls(cc, lto, cfi)

    @property
    def variant(self) -> str:
        """Test-kernel variant name: ``clang``, ``clang-thin``, ``clang-thin-cfi``, ``clang-cfi``."""
        parts = [self.cc] + (["thin"] if self.lto == "thin-dist" else [self.lto] if self.lto != "none" else [])
        return "-".join(parts + (["cfi"] if self.cfi else []))


def variant_for(toolchain: str, lto: str | None, cfi: bool) -> str:
    """The variant of ``kernel prepare --toolchain T [--lto thin] [--cfi]``; raises :class:`InputError` for
    combinations the test kernels do not offer (LTO and kCFI need Clang; full LTO: see :func:`check_supported`).

    >>> variant_for("clang", "thin", True)
    'clang-thin-cfi'
    """
    if toolchain != "clang":
        if lto or cfi:
            raise InputError("--lto and --cfi need --toolchain clang (GCC has neither kernel LTO nor kCFI)")
        return ""
    if lto not in (None, "thin"):
        raise InputError(f"--lto {lto}: only thin (7.3's distributed ThinLTO) is built as a test kernel; "
                         "full LTO leaves no per-object native code to diff (see docs/clang.md)")
    return Toolchain("clang", "thin-dist" if lto else "none", cfi).variant


def check_supported(tc: Toolchain, where: Path) -> None:
    """Refuse, with the reason and what support would cost, the LTO modes ``klpforge build`` cannot
    rebuild incrementally: in-process ThinLTO and full LTO keep the post-LTO code of an object only inside
    the linked ``vmlinux.o`` (no ``*.thinlto-native.o``)."""
    if tc.lto == "thin":
        raise InputError(f"{where}: CONFIG_LTO_CLANG_THIN (in-process ThinLTO) keeps no per-object native code: "
                         "rebuild the kernel with CONFIG_LTO_CLANG_THIN_DIST (same code, Kbuild runs the backend "
                         "per object), or diff two whole vmlinux.o links per patch (a full relink, not supported)")
    if tc.lto == "full":
        raise InputError(f"{where}: CONFIG_LTO_CLANG_FULL optimises vmlinux as one module: any change recompiles "
                         "all of its code in one link (a full build per patch), not supported; use ThinLTO "
                         "(CONFIG_LTO_CLANG_THIN_DIST)")


def clang_root_for(cc_text: str, cache: str | os.PathLike[str] | None = None,
                   say: object = None) -> object:
    """The Clang build root (:class:`klpforge.distro.roots.BuildRoot`) whose clang prints ``cc_text``
    (``CONFIG_CC_VERSION_TEXT``: ``Debian clang version 19.1.7 (3+b1)``); made on first use.

    Raises :class:`InputError` when the root's clang prints another line (another clang built the tree).
    """
    from ..distro.roots import clang_root  # distro imports kbuild: resolved at call time

    root = clang_root(cache, say)  # type: ignore[arg-type]
    if cc_text and root.cc_text != cc_text:
        raise InputError(f"the tree was built with '{cc_text}' but the Clang build root has '{root.cc_text}': "
                         "objects built now would not match the running kernel")
    return root


def root_binds(*paths: Path) -> list[Path]:
    """What a build inside the root must see at its own path: the trees, and the temporary directory."""
    return sorted({Path(p).resolve() for p in paths} | {Path(tempfile.gettempdir()).resolve()})


def wrap_shell(root: object, cmd: str, binds: list[Path], cwd: Path) -> list[str]:
    """``sh -c cmd`` inside ``root`` (a ``BuildRoot``) with ``binds`` writable, in ``cwd``."""
    return root.wrap(["sh", "-c", cmd], binds, cwd)  # type: ignore[attr-defined]


def cc_version_text(config_path: Path) -> str:
    """``CONFIG_CC_VERSION_TEXT`` of a ``.config`` (``""`` when absent)."""
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="(.*)"$', config_path.read_text(), re.M)
    return m.group(1) if m else ""


def shell_join(argv: list[str]) -> str:
    """``argv`` quoted for ``sh -c``."""
    return " ".join(shlex.quote(a) for a in argv)


@contextmanager
def tools_in_root(root: object, binds: list[Path]) -> Iterator[None]:
    """While inside, ``PATH`` starts with a directory whose :data:`LLVM_TOOLS` enter ``root`` (a
    ``BuildRoot``) with ``binds`` writable, in the caller's directory when the root sees it (else ``/``):
    Kbuild's recorded commands and ``make M=`` run unchanged. ``os.environ`` is process-wide: one build at a
    time per process (the CLI's case)."""
    seen = sorted({str(Path(b).resolve()) for b in binds} | {"/tmp"})
    case = "|".join(f"{shlex.quote(b)}|{shlex.quote(b)}/*" for b in seen)
    with tempfile.TemporaryDirectory(prefix="klpforge-clang-bin-") as td:
        for tool in LLVM_TOOLS:
            wrapped = root.wrap([tool], binds)  # type: ignore[attr-defined]
            script = Path(td) / tool
            script.write_text("#!/bin/sh\n# klpforge: run in the Clang build root\n"
                              + f'case "$PWD" in {case}) d="$PWD" ;; *) d=/ ;; esac\n'
                              + "exec " + " ".join(shlex.quote(a) for a in wrapped[:-1])
                              + ' --chdir "$d" ' + shlex.quote(tool) + ' "$@"\n')
            script.chmod(0o755)
        old = os.environ.get("PATH", "")
        old_llvm = os.environ.get("LLVM")
        os.environ["PATH"] = f"{td}:{old}"
        os.environ["LLVM"] = LLVM_SUFFIX  # `make M=` must pick the same tools as the tree's build
        try:
            yield
        finally:
            os.environ["PATH"] = old
            if old_llvm is None:
                os.environ.pop("LLVM", None)
            else:
                os.environ["LLVM"] = old_llvm


@dataclass(frozen=True)
class RootRunner:
    """Runs shell commands in ``root`` with ``binds`` writable (``runner(cmd, cwd)``), as a child of
    :mod:`klpforge.util.proc` (ended with klpforge)."""

    root: object
    binds: tuple[Path, ...]

    def __call__(self, cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        argv = wrap_shell(self.root, cmd, list(self.binds), cwd)
        return run(argv, capture_output=True, text=True)
