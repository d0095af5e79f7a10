"""Which shipped modules a guest needs: the requested ones and their dependencies, in load order.

Dependencies come from ``modules.dep`` (Debian's image package ships none; ``depmod -b`` writes it into
the cached, unpacked image once).

>>> load_order({"a": ["b", "c"], "b": ["c"], "c": []}, ["a"])
['c', 'b', 'a']
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import InputError
from .base import DistroTree, tree_lock

__all__ = ["modules_dep", "load_order", "modules_for", "shipped_modules"]


def modules_dep(tree: DistroTree) -> dict[str, tuple[Path, list[str]]]:
    """Module name -> (``.ko`` path, names it depends on), from ``modules.dep`` (generated if missing)."""
    mdir = tree.modules_dir
    if mdir is None or tree.image is None:
        raise InputError("no shipped modules directory")
    dep = mdir / "modules.dep"
    if not dep.is_file():
        depmod = shutil.which("depmod") or ("/usr/sbin/depmod" if Path("/usr/sbin/depmod").exists() else None)
        if not depmod:
            raise InputError("depmod not found (Debian package kmod) and the image ships no modules.dep")
        with tree_lock(tree.lock or mdir / ".lock"):
            if not dep.is_file():
                r = subprocess.run([depmod, "-b", str(tree.image), tree.release], capture_output=True, text=True,
                                   check=False)
                if r.returncode != 0 or not dep.is_file():
                    raise InputError(f"depmod -b {tree.image} failed: {r.stderr.strip()[:300]}")
    out: dict[str, tuple[Path, list[str]]] = {}
    for line in dep.read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        name = Path(path).name.split(".ko", 1)[0].replace("-", "_")
        out[name] = (mdir / path, [Path(d).name.split(".ko", 1)[0].replace("-", "_") for d in deps.split()])
    return out


def load_order(deps: dict[str, list[str]], wanted: list[str]) -> list[str]:
    """Dependencies first (depth-first post-order), each module once."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(m: str) -> None:
        if m in seen:
            return
        seen.add(m)
        for d in deps.get(m, []):
            visit(d)
        order.append(m)

    for w in wanted:
        visit(w)
    return order


def modules_for(tree: DistroTree, wanted: list[str]) -> list[Path]:
    """The ``.ko`` files to insmod, in order, for ``wanted`` (names with ``-`` or ``_``)."""
    table = modules_dep(tree)
    names = [w.replace("-", "_").removesuffix(".ko") for w in wanted]
    for n in names:
        if n not in table:
            raise InputError(f"module {n} is not shipped for {tree.release}")
    for_order = {k: v[1] for k, v in table.items()}
    return [table[m][0] for m in load_order(for_order, names)]


def shipped_modules(tree: DistroTree) -> set[str]:
    """Names (``_`` spelling) of every module shipped for ``tree.release``."""
    return set(modules_dep(tree))
