"""Which shipped modules to load, in which order, for a set of wanted ones: what ``modprobe`` would do.

``modprobe`` (kmod 30, ``libkmod/libkmod-module.c``) loads a module after its hard dependencies
(``modules.dep``, written by ``depmod``) and its soft ones: ``softdep <mod> pre: <a> <b> post: <c>`` lines
(``modules.softdep``, from ``MODULE_SOFTDEP()`` in the module, e.g. ``libcrc32c pre: crc32c``), each name resolved
like a command-line name: a module, a built-in module (nothing to load: ``modules.builtin``), or an alias
(``modules.alias``, shell patterns; *every* module an alias matches is loaded, as kmod does, e.g. ``crc32c`` ->
``crc32c_intel`` and ``crc32c_generic``). Pre soft dependencies load before the module, post ones after it. A
soft dependency that resolves to nothing is skipped (modprobe ignores it too); a wanted name that does not is an
error.

The guest runs busybox, whose ``modprobe`` knows neither softdeps nor kmod's binary indexes, so klpforge computes
the order here, from the same files, and the guest ``insmod``\\ s each module in turn (naming the one that fails
and the kernel's own messages about it).

>>> idx = ModIndex({"xfs": ("k/xfs.ko", ["libcrc32c"]), "libcrc32c": ("k/libcrc32c.ko", []),
...                 "crc32c_generic": ("k/crc32c_generic.ko", [])}, {"libcrc32c": (["crc32c"], [])},
...                 [("crc32c", "crc32c_generic")], set())
>>> idx.load_order(["xfs"])
['crc32c_generic', 'libcrc32c', 'xfs']
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError

__all__ = ["ModIndex", "modname"]


def modname(path_or_name: str) -> str:
    """The kernel's name for a module file or a name given by a user: no directory, no ``.ko[.xz|.zst|.gz]``,
    ``-`` spelled ``_``.

    >>> modname("kernel/fs/nfsd/nfsd.ko.xz"), modname("crc32c-intel")
    ('nfsd', 'crc32c_intel')
    """
    return path_or_name.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


@dataclass
class ModIndex:
    """The module indexes of one release: ``deps`` (name -> (path relative to the modules directory, hard
    dependencies)), ``softdeps`` (name -> (pre, post) names as written), ``aliases`` ((pattern, module) in
    file order), ``builtin`` (names of modules built into the kernel)."""

    deps: dict[str, tuple[str, list[str]]]
    softdeps: dict[str, tuple[list[str], list[str]]]
    aliases: list[tuple[str, str]]
    builtin: set[str]
    #: the kernel release (the modules directory's name), for messages
    release: str = ""

    @classmethod
    def read(cls, mdir: Path) -> ModIndex:
        """Read ``modules.dep`` (required), ``modules.softdep``, ``modules.alias`` and ``modules.builtin`` of
        ``mdir`` (``lib/modules/<release>``); raises :class:`InputError` when ``modules.dep`` is missing."""
        try:
            dep_text = (mdir / "modules.dep").read_text()
        except OSError as e:
            raise InputError(f"{mdir}/modules.dep: cannot read ({e.strerror}): run depmod") from None
        deps: dict[str, tuple[str, list[str]]] = {}
        for line in dep_text.splitlines():
            if ":" in line:
                path, rest = line.split(":", 1)
                deps[modname(path)] = (path, [modname(d) for d in rest.split()])
        softdeps: dict[str, tuple[list[str], list[str]]] = {}
        for line in _lines(mdir / "modules.softdep"):
            f = line.split()
            if len(f) < 3 or f[0] != "softdep":
                continue
            pre, post = softdeps.setdefault(modname(f[1]), ([], []))
            where = pre
            for tok in f[2:]:
                if tok in ("pre:", "post:"):
                    where = pre if tok == "pre:" else post
                else:
                    where.append(tok)
        aliases = [(f[1], modname(f[2])) for f in (ln.split() for ln in _lines(mdir / "modules.alias"))
                   if len(f) == 3 and f[0] == "alias"]
        builtin = {modname(ln) for ln in _lines(mdir / "modules.builtin")}
        return cls(deps, softdeps, aliases, builtin, mdir.name)

    def resolve(self, name: str) -> list[str]:
        """Modules ``name`` stands for: itself if shipped, nothing if built in, else every alias match."""
        m = modname(name)
        if m in self.deps:
            return [m]
        if m in self.builtin:
            return []
        out: list[str] = []
        for pat, mod in self.aliases:
            if (pat == name or fnmatch.fnmatchcase(name, pat)) and mod in self.deps and mod not in out:
                out.append(mod)
        return out

    def load_order(self, wanted: list[str]) -> list[str]:
        """Module names to load, in order, so that each ``wanted`` one loads as ``modprobe`` would load it.

        Raises :class:`InputError` for a wanted name that is neither shipped, built in nor an alias."""
        order: list[str] = []
        busy: set[str] = set()

        def visit(m: str) -> None:
            if m in order or m in busy:
                return  # loaded already, or a cycle through soft dependencies (kmod breaks it too)
            busy.add(m)
            pre, post = self.softdeps.get(m, ([], []))
            for s in pre:
                for r in self.resolve(s):
                    visit(r)
            for d in reversed(self.deps[m][1]):  # modules.dep lists the deepest dependency last
                visit(d)
            order.append(m)
            busy.discard(m)
            for s in post:
                for r in self.resolve(s):
                    visit(r)

        for w in wanted:
            mods = self.resolve(w)
            if not mods and modname(w) not in self.builtin:
                raise InputError(f"module {w} is not shipped for {self.release}")
            for m in mods:
                visit(m)
        return order

    def path(self, m: str) -> str:
        """``m``'s file, relative to the modules directory."""
        return self.deps[m][0]


def _lines(p: Path) -> list[str]:
    try:
        return p.read_text().splitlines()
    except OSError:
        return []
