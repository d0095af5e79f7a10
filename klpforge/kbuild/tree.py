"""A built kernel tree (in-tree or ``O=``): its config, recorded compile commands and link parents.

Relies on Linux 6.1 Kbuild: ``<build>/<dir>/.<obj>.o.cmd`` holds ``cmd_<obj>.o := <command>`` (make-escaped:
``$$`` for ``$``, ``$(pound)`` for ``#``) and ``deps_<obj>.o``; ``modules.order`` lists ``<dir>/<mod>.ko``;
``<dir>/<mod>.mod`` lists the module's member objects; ``vmlinux.a`` is a thin archive of vmlinux's objects.

>>> tree = KernelTree(Path("linux"), Path("build"))          # doctest: +SKIP
>>> tree.parent_of("fs/proc/cmdline.o").target               # doctest: +SKIP
'vmlinux'
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["KernelTree", "Parent", "CompileCommand", "gcc_on_path", "cmd_file_of", "parse_cmd_file",
           "cmd_dependencies"]


@dataclass(frozen=True)
class Parent:
    """What an object is linked into: ``target`` is ``vmlinux`` or the module name (``-`` -> ``_``),
    ``binary`` the linked ELF whose symbol table resolves it (``vmlinux`` or the ``.ko``)."""

    target: str
    binary: Path


@dataclass(frozen=True)
class CompileCommand:
    """A recorded Kbuild command for ``obj`` (build-relative), runnable from the build directory."""

    obj: str
    command: str
    source: Path

    def redirected(self, out: Path, extra_flags: str = "-ffunction-sections -fdata-sections") -> str:
        """The command writing to ``out`` (and its ``.d`` next to it) instead of the tree, with
        ``extra_flags`` added before ``-c``; objtool and other post-steps follow the output.

        >>> CompileCommand("a/b.o", "gcc -Wp,-MMD,a/.b.o.d -c -o a/b.o /s/a/b.c ; objtool a/b.o",
        ...                Path("/s/a/b.c")).redirected(Path("/t/b.o"), "-fX")
        'gcc -Wp,-MMD,/t/.b.o.d -fX -c -o /t/b.o /s/a/b.c ; objtool /t/b.o'
        """
        d = self.obj.rsplit("/", 1)
        dep = f"{d[0]}/.{d[1]}.d" if len(d) == 2 else f".{self.obj}.d"
        cmd = self.command.replace(f"-Wp,-MMD,{dep}", f"-Wp,-MMD,{out.parent}/.{out.name}.d")
        if " -c -o " not in cmd:
            raise InputError(f"unexpected compile command for {self.obj}: no '-c -o'")
        cmd = cmd.replace(" -c -o ", f" {extra_flags} -c -o ", 1)
        # Every whole-word occurrence of the object path (the -o argument, objtool's argument).
        cmd = re.sub(rf"(?<![\w/.-]){re.escape(self.obj)}(?![\w/.-])", str(out), cmd)
        if str(out) not in cmd:
            raise InputError(f"could not redirect the compile command of {self.obj}")
        return cmd


def gcc_on_path() -> str:
    """``gcc --version`` first line, e.g. ``gcc (Debian 12.2.0-14+deb12u1) 12.2.0``."""
    try:
        r = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise InputError("gcc not found on PATH") from None
    return r.stdout.splitlines()[0].strip()



_DEPS = re.compile(r"^(?:source_\S+ := (\S+)|deps_\S+ := \\\n((?:.*\\\n)*.*))", re.M)


def cmd_dependencies(text: str, src: Path, build: Path) -> set[str]:
    """Every file a Kbuild ``.cmd`` file records its object as read from: the ``source_<obj>`` line and the
    ``deps_<obj> := \\`` list (fixdep's rewrite of gcc's ``-MMD`` output, scripts/basic/fixdep.c of Linux
    6.1: one path a line, ``$(wildcard ...)`` for config headers). Shape: a set of normalised paths,
    tree-relative for files under ``src``, build-relative for generated ones (relative entries are relative
    to ``build``, where Kbuild runs gcc), absolute otherwise; ``a/../b`` is folded.

    >>> sorted(cmd_dependencies("source_x.o := /s/fs/x.c\\ndeps_x.o := \\\\\\n  /s/fs/x.c \\\\\\n"
    ...                         "  /s/fs/../fs/y.c \\\\\\n  include/generated/z.h \\\\\\n\\n", Path("/s"), Path("/b")))
    ['fs/x.c', 'fs/y.c', 'include/generated/z.h']
    """
    out: set[str] = set()
    top, bld = os.path.normpath(src), os.path.normpath(build)
    for m in _DEPS.finditer(text):
        items = [m.group(1)] if m.group(1) else [x.strip().rstrip("\\").strip() for x in m.group(2).splitlines()]
        for x in items:
            if not x or x.startswith("$(wildcard"):
                continue
            p = os.path.normpath(x if os.path.isabs(x) else os.path.join(bld, x))
            for base in (top, bld):
                if p.startswith(base + "/"):
                    p = p[len(base) + 1:]
                    break
            out.add(p)
    return out

class KernelTree:
    """A configured and built kernel: ``src`` (sources) and ``build`` (objects; same as ``src`` in-tree)."""

    def __init__(self, src: Path, build: Path | None = None):
        self.src = src.resolve()
        self.build = (build or src).resolve()
        if not (self.src / "Makefile").is_file() or not (self.src / "kernel").is_dir():
            raise InputError(f"{src}: not a kernel source tree (no Makefile/kernel/)")
        if not (self.build / ".config").is_file():
            raise InputError(f"{self.build}: no .config (configure and build the kernel first, or pass -O)")
        if not (self.build / "vmlinux").is_file():
            raise InputError(f"{self.build}: no vmlinux (build the kernel first)")

    @cached_property
    def config(self) -> dict[str, str]:
        """``CONFIG_X`` -> value from ``.config`` (only set symbols)."""
        out = {}
        for line in (self.build / ".config").read_text().splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
        return out

    @property
    def vmlinux(self) -> Path:
        """The linked kernel image with symbols."""
        return self.build / "vmlinux"

    @property
    def symvers(self) -> Path | None:
        """``Module.symvers`` if the build wrote one."""
        p = self.build / "Module.symvers"
        return p if p.is_file() else None

    def kernel_release(self) -> str:
        """``include/config/kernel.release`` (e.g. ``6.1.0``... as built)."""
        p = self.build / "include/config/kernel.release"
        return p.read_text().strip() if p.is_file() else "unknown"

    def check_livepatch(self) -> None:
        """Refuse a kernel built without ``CONFIG_LIVEPATCH``."""
        if self.config.get("CONFIG_LIVEPATCH") != "y":
            raise InputError(f"{self.build}/.config: CONFIG_LIVEPATCH is not set; "
                             "this kernel cannot load live patches")
        if self.config.get("CONFIG_MODULES") != "y":
            raise InputError(f"{self.build}/.config: CONFIG_MODULES is not set")

    def vmlinux_compiler(self) -> str:
        """The GCC version string recorded in vmlinux's ``.comment``."""
        with self.vmlinux.open("rb") as f:
            sec = ELFFile(f).get_section_by_name(".comment")
            data = sec.data() if sec is not None else b""
        names = [s.decode(errors="replace") for s in data.split(b"\0") if s.startswith(b"GCC:")]
        if not names:
            raise InputError(f"{self.vmlinux}: no GCC version in .comment (not built by gcc?)")
        return names[0]

    def check_compiler(self) -> None:
        """Refuse when gcc on PATH is not the compiler vmlinux was built with (``.comment``).

        ``.comment`` reads ``GCC: (Debian 12.2.0-14+deb12u1) 12.2.0``; ``gcc --version`` prints
        ``gcc (Debian 12.2.0-14+deb12u1) 12.2.0``.
        """
        built = self.vmlinux_compiler().removeprefix("GCC:").strip()
        now = gcc_on_path()
        now_ver = now.split(None, 1)[1] if " " in now else now
        if built != now_ver.strip():
            raise InputError(f"compiler mismatch: vmlinux was built by '{built}' but gcc on PATH is "
                             f"'{now_ver.strip()}'; objects built now would not match the running kernel")

    def cmd_file(self, obj: str) -> Path:
        """Path of the ``.<obj>.cmd`` file for build-relative ``obj``."""
        p = Path(obj)
        return self.build / p.parent / f".{p.name}.cmd"

    def compile_command(self, obj: str) -> CompileCommand:
        """The recorded command that compiled ``obj`` (e.g. ``fs/proc/cmdline.o``)."""
        cmdf = self.cmd_file(obj)
        try:
            text = cmdf.read_text()
        except OSError:
            raise InputError(f"{cmdf} not found: {obj} was not built in {self.build} "
                             "(is its CONFIG option off?)") from None
        got = parse_cmd_file(text, obj)
        if got is None:
            raise InputError(f"{cmdf}: no cmd_/source_ line for {obj}")
        cmd, src = got
        srcp = Path(src) if Path(src).is_absolute() else self.build / src
        return CompileCommand(obj, cmd, srcp)

    def check_sources(self, objs: list[str]) -> None:
        """Refuse when an object was compiled from a file outside ``src``: the build directory belongs to
        another (moved or copied) source tree, and compiling its commands would read that tree.

        The ``source_<obj>`` line of each ``.cmd`` is what Kbuild compiled (absolute for ``O=`` builds,
        relative to the build directory in-tree).
        """
        for obj in objs:
            cc = self.compile_command(obj)
            real = Path(os.path.realpath(cc.source))
            if real != self.src and self.src not in real.parents:
                raise InputError(f"{self.cmd_file(obj)}: {obj} was compiled from {cc.source}, which is not in "
                                 f"the source tree {self.src} (-s); this build directory belongs to another "
                                 "(moved or copied) tree: pass the source tree it was built from")
            if not real.is_file():
                raise InputError(f"{cc.source}: the source of {obj} is missing")

    def object_for_source(self, rel_src: str) -> str:
        """Build-relative object compiled from tree-relative C file ``rel_src``."""
        if not rel_src.endswith(".c"):
            raise InputError(f"{rel_src}: only C files map to objects")
        return rel_src[:-2] + ".o"

    def objects_including(self, path: str) -> list[str]:
        """Kernel objects whose translation unit reads ``path`` (tree-relative; any extension: a header, a
        ``.c`` another ``.c`` includes, an ``.inc``), from the dependency lists Kbuild's fixdep wrote into the
        ``.cmd`` files (:func:`cmd_dependencies`); a ``.c`` file's own object is among them. Host tools'
        objects (``tools/``, ``scripts/``) are not kernel objects and are left out."""
        want = os.path.normpath(path)
        # cheap first pass: the path itself (absolute or in-tree), or its name after a "../" (gcc keeps
        # `#include "../x.c"` unfolded); only those files are parsed
        r = run(["grep", "-rlE", "--include=.*.o.cmd", "-e", "(^|[ /])" + re.escape(want) + "( |$)",
                 "-e", r"\.\./(\S*/)?" + re.escape(Path(want).name) + "( |$)", str(self.build)],
                capture_output=True, text=True)
        found = []
        for line in r.stdout.splitlines():
            p = Path(line)
            obj = str((p.parent / p.name[1:-4]).relative_to(self.build))
            if obj.startswith(("tools/", "scripts/")) or not (self.build / obj).is_file():
                continue
            try:
                deps = cmd_dependencies(p.read_text(errors="replace"), self.src, self.build)
            except OSError:
                continue
            if want in deps:
                found.append(obj)
        return sorted(found)

    @cached_property
    def modules(self) -> dict[str, str]:
        """Member object -> module ``.ko`` path (build-relative), from ``modules.order`` + ``.mod``."""
        out: dict[str, str] = {}
        order = self.build / "modules.order"
        if not order.is_file():
            return out
        for line in order.read_text().split():
            ko = line[:-2] + ".ko" if line.endswith(".o") else line  # 6.1 lists .ko, later .o
            mod = self.build / (ko[:-3] + ".mod")
            members = mod.read_text().split() if mod.is_file() else [ko[:-3] + ".o"]
            for m in members:
                out[m] = ko
        return out

    @cached_property
    def vmlinux_objects(self) -> set[str]:
        """Objects linked into vmlinux: the members of the thin archive ``vmlinux.a`` (6.1).

        Read from the archive's long-name table (``//`` member) because ``ar t`` collapses members
        that share a base name.
        """
        ar = self.build / "vmlinux.a"
        try:
            data = ar.read_bytes()
        except OSError:
            return set()
        if not data.startswith(b"!<thin>\n"):
            return set()
        pos = 8
        while pos + 60 <= len(data):
            name = data[pos:pos + 16].rstrip()
            size = int(data[pos + 48:pos + 58].strip() or b"0")
            pos += 60
            if name == b"//":
                table = data[pos:pos + size].decode(errors="replace")
                # 7.3 distributed ThinLTO links X.thinlto-native.o, the backend output of bitcode X.o
                return {n.removesuffix(".thinlto-native.o") + ".o" if n.endswith(".thinlto-native.o") else n
                        for n in table.split("/\n") if n.endswith(".o")}
            if name in (b"/", b"/SYM64/"):
                pos += size + (size & 1)  # symbol index: stored in a thin archive, skip it
        return set()

    def parent_of(self, obj: str) -> Parent:
        """vmlinux or the module an object is linked into."""
        if obj in self.modules:
            ko = self.modules[obj]
            name = Path(ko).name[:-3].replace("-", "_")
            return Parent(name, self.build / ko)
        vo = self.vmlinux_objects
        if obj in vo or (not vo and (self.build / obj).is_file()):
            return Parent("vmlinux", self.vmlinux)
        if (self.build / obj).is_file():
            raise InputError(f"{obj} is built but linked into neither vmlinux nor a module "
                             "(host tool, boot code or an init-only archive?)")
        raise InputError(f"{obj} is not built in {self.build} (is its CONFIG option off?)")

    def make_args(self) -> list[str]:
        """``make`` arguments that address this tree (``-C build``)."""
        return ["make", "-C", str(self.build)]

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.src} (build {self.build}, {self.kernel_release()})"


def shell_quote(s: str) -> str:
    """Quote for a POSIX shell."""
    return shlex.quote(s)


def cmd_file_of(build: Path, obj: str) -> Path:
    """Kbuild's record of how ``obj`` was built: ``build/<dir>/.<name>.cmd``."""
    p = Path(obj)
    return build / p.parent / f".{p.name}.cmd"


def parse_cmd_file(text: str, obj: str) -> tuple[str, str] | None:
    """``(command, source)`` from the text of ``obj``'s ``.cmd`` file, the command unescaped from make
    (scripts/Kbuild.include, 6.1: ``$$`` for ``$``, ``$(pound)`` for ``#``); None without both lines."""
    cmd = src = None
    for line in text.splitlines():
        if line.startswith((f"cmd_{obj} := ", f"savedcmd_{obj} := ")):  # savedcmd_: Linux >= 6.2 (6.12)
            cmd = line.split(" := ", 1)[1]
        elif line.startswith(f"source_{obj} := "):
            src = line.split(" := ", 1)[1].strip()
    if not cmd or not src:
        return None
    return cmd.replace("$(pound)", "#").replace("$$", "$"), src
