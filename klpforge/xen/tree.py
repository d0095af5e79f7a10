"""A built Xen tree: build it once (cached), and recompile single objects the way its build did.

Xen 4.17's build records each object's compiler command in ``.<name>.o.cmd`` (``cmd_<obj> := ...``)
with its dependencies (``deps_<obj> := ...``); ``xen/Rules.mk`` then renames the object's FILE
symbol to the tree-relative path (``objcopy --redefine-sym foo.c=common/foo.c``), which is the file
part of Xen's ``file#symbol`` names. CONFIG_LIVEPATCH selects CONFIG_CC_SPLIT_SECTIONS, so the
recorded commands already carry ``-ffunction-sections -fdata-sections``.

>>> t = XenTree(Path("xen-src"))                    # doctest: +SKIP
>>> t.objects_for("xen/common/event_fifo.c")       # doctest: +SKIP
['common/event_fifo.o']
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["XenTree", "prepare_tree", "ObjectCommand", "LIVEPATCH_FLAGS"]

#: Flags every recompiled object gets, even if the recorded command lacks them.
LIVEPATCH_FLAGS = ("-ffunction-sections", "-fdata-sections")

_CMD = re.compile(r"^cmd_(\S+) := (.*)$", re.M)
_DEPS = re.compile(r"^deps_(\S+) := \\\n((?:.*\\\n)*)", re.M)


class ObjectCommand:
    """The recorded compile of one object (paths relative to the hypervisor directory)."""

    def __init__(self, obj: str, argv: list[str], source: str, deps: list[str]):
        self.obj, self.argv, self.source, self.deps = obj, argv, source, deps

    def for_output(self, out: Path) -> list[str]:
        """The compiler command writing ``out``, without dependency-file options."""
        argv, i = [], 0
        src = self.argv
        while i < len(src):
            a = src[i]
            if a in ("-MMD", "-MP"):
                i += 1
                continue
            if a in ("-MF", "-MQ", "-MT", "-o"):
                i += 2
                continue
            argv.append(a)
            i += 1
        argv += [f for f in LIVEPATCH_FLAGS if f not in argv]
        return argv + ["-o", str(out)]


class XenTree:
    """A Xen source tree (the repository root, holding ``xen/``) whose hypervisor has been built."""

    def __init__(self, root: Path):
        root = root.resolve()
        if (root / "xen" / "Rules.mk").is_file():
            self.root, self.hv = root, root / "xen"
        elif (root / "Rules.mk").is_file() and (root / "common").is_dir():
            self.root, self.hv = root.parent, root
        else:
            raise InputError(f"{root}: not a Xen source tree (no xen/Rules.mk)")
        if not (self.hv / "xen-syms").is_file():
            raise InputError(f"{self.hv}: the hypervisor is not built (no xen-syms): run make -C xen first")
        self._cmds: dict[str, ObjectCommand] | None = None

    @property
    def config(self) -> Path:
        return self.hv / ".config"

    def config_value(self, name: str) -> str | None:
        """``CONFIG_<name>``'s value in the tree's .config (None if unset)."""
        m = re.search(rf"^CONFIG_{name}=(.*)$", self.config.read_text(), re.M)
        return m.group(1) if m else None

    def commands(self) -> dict[str, ObjectCommand]:
        """Every C object's recorded command, keyed by object path relative to ``xen/``."""
        if self._cmds is None:
            out: dict[str, ObjectCommand] = {}
            for cmdfile in self.hv.rglob(".*.o.cmd"):
                text = cmdfile.read_text(errors="replace")
                m = _CMD.search(text)
                if not m or " -c " not in m.group(2):
                    continue
                obj = m.group(1)
                argv = shlex.split(m.group(2))
                src = next((a for a in argv if a.endswith(".c")), "")
                d = _DEPS.search(text)
                deps = [x.strip().rstrip("\\").strip() for x in d.group(2).splitlines()] if d else []
                deps = [x[len("$(wildcard "):-1] if x.startswith("$(wildcard") else x for x in deps]
                out[obj] = ObjectCommand(obj, argv, src, [x for x in deps if x])
            self._cmds = out
        return self._cmds

    def objects_for(self, path: str) -> list[str]:
        """Objects (relative to ``xen/``) compiled from or including ``path`` (relative to the root; any
        included file: a header, or a ``.c`` another ``.c`` includes, as common/compat/kernel.c includes
        ``../kernel.c``), from the recorded dependency lists with ``a/../b`` folded."""
        rel = os.path.normpath(path[len("xen/"):] if path.startswith("xen/") else path)
        hv = os.path.normpath(self.hv)
        folded: dict[str, set[str]] = self.__dict__.setdefault("_folded", {})
        if not folded:
            # gcc records `#include "../kernel.c"` unfolded (common/compat/../kernel.c in
            # common/compat/.kernel.o.cmd, Xen 4.17): fold before comparing, or the compat copy is missed
            for obj, c in self.commands().items():
                folded[obj] = {os.path.normpath(os.path.join(hv, d)) for d in (c.source, *c.deps) if d}
        want = str(Path(hv) / rel)
        return sorted(obj for obj, deps in folded.items() if want in deps)

    def compile(self, obj: str, out: Path, extra: list[str] | None = None, view: Path | None = None) -> None:
        """Recompile ``obj`` into ``out``, FILE symbol as Xen names it, reading the sources through
        ``view`` (a :class:`~klpforge.kbuild.overlay.Overlay` view of :attr:`root`; the tree itself is never
        written) or from the tree when None.

        ``extra`` flags are added (``-I`` for the hooks header). Raises :class:`InputError` with the
        compiler's first error lines if it fails."""
        c = self.commands().get(obj)
        if c is None:
            raise InputError(f"{obj}: no recorded compile command in {self.hv}")
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = c.for_output(out)
        cwd = self.hv
        if view is not None:  # Xen's recorded commands are relative to xen/; map any absolute path too
            cwd = view / self.hv.relative_to(self.root)
            top = str(self.root) + "/"
            argv = [a.replace(top, str(view) + "/") if top in a else a for a in argv[:-2]] + argv[-2:]
        r = run(argv[:-2] + list(extra or []) + argv[-2:], cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            err = [x for x in r.stderr.splitlines() if "error" in x][:3] or r.stderr.splitlines()[-3:]
            raise InputError(f"compiling {c.source} failed: {' | '.join(err)}")
        base = os.path.basename(c.source)
        if base != c.source:  # xen/Rules.mk cmd_objcopy_fix_sym
            r = run(["objcopy", "--redefine-sym", f"{base}={c.source}", str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                raise InputError(f"objcopy on {out} failed: {r.stderr.strip()}")


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def prepare_tree(tarball: Path, config: Path, cache: Path, jobs: int = 2,
                 log: Callable[[str], None] = lambda _m: None) -> XenTree:
    """Unpack ``tarball`` (a Xen release tree, ``xen/`` inside one top directory or at the top) under
    ``cache``, build the hypervisor with ``config`` (``make olddefconfig`` then ``make -j``), once per
    (tarball, config) pair; returns the built tree. About 100 s of CPU for Xen 4.17 with Debian's config.

    Raises :class:`InputError` if the tarball or build fails (the log is named)."""
    for p in (tarball, config):
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    key = _digest(tarball, config)
    top = cache / f"tree-{key}"
    stamp = top / ".klpforge-built"
    if stamp.is_file():
        return XenTree(Path(stamp.read_text().strip()))
    tmp = cache / f".tree-{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"unpacking {tarball.name}")
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="tar")
    roots = [p for p in tmp.iterdir() if p.is_dir()]
    root = tmp if (tmp / "xen" / "Rules.mk").is_file() else next(
        (r for r in roots if (r / "xen" / "Rules.mk").is_file()), None)
    if root is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{tarball}: no xen/Rules.mk inside: not a Xen source tarball")
    shutil.rmtree(top, ignore_errors=True)
    os.replace(tmp, top)
    root = top / root.relative_to(tmp)
    hv = root / "xen"
    shutil.copyfile(config, hv / ".config")
    logf = top / "build.log"
    log(f"building the hypervisor once (make -j{jobs}; log {logf})")
    with logf.open("w") as lf:
        for cmd in (["make", "olddefconfig"], ["make", f"-j{jobs}"]):
            r = run(cmd, cwd=hv, stdout=lf, stderr=subprocess.STDOUT)  # own group: ended with klpforge
            if r.returncode != 0:
                raise InputError(f"building Xen failed ({' '.join(cmd)}): see {logf}")
    stamp.write_text(str(root) + "\n")
    return XenTree(root)
