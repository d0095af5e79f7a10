"""Where installed live patches live: ``<root>/var/lib/klpforge/<release>/``, one directory per kernel release.

Per patch ``NAME`` (the module name): ``NAME.ko`` (mode 0644), ``NAME.klp`` (``key=value`` lines the
shell loader reads: ``objects``, ``replace``, ``sha256``, ``vermagic``) and ``NAME.json`` (everything
:func:`klpforge.host.inspect.inspect_module` found). ``load-order`` lists the names in installation order:
the boot unit loads them in that order, so a later cumulative (``replace``) patch replaces the earlier ones,
as when they were installed one after the other.

Packages made by ``klpforge package`` put their module in ``<root>/usr/lib/klpforge/<release>/`` (owned by
the package, loaded by the package's own unit); :func:`installed` lists both.

``root`` is ``/`` unless ``--root`` or ``$KLPFORGE_ROOT`` names another (tests, image builders: the
``DESTDIR`` convention).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from .inspect import PatchModule

__all__ = ["STORE", "PACKAGED", "InstalledPatch", "host_root", "store_dir", "install_module", "installed",
           "sidecar_text"]

STORE = "var/lib/klpforge"
PACKAGED = "usr/lib/klpforge"


def host_root(arg: str | None = None) -> Path:
    """The root directory: ``arg`` (``--root``), else ``$KLPFORGE_ROOT``, else ``/``."""
    return Path(arg or os.environ.get("KLPFORGE_ROOT") or "/")


def store_dir(root: Path, release: str) -> Path:
    """``<root>/var/lib/klpforge/<release>``."""
    if not release or "/" in release or release in (".", ".."):
        raise InputError(f"bad kernel release {release!r}")
    return root / STORE / release


def sidecar_text(pm: PatchModule) -> str:
    """The ``NAME.klp`` lines the shell loader reads (``objects`` decides which modules must be loaded).

    >>> from klpforge.host.inspect import KlpObject
    >>> pm = PatchModule(Path("x.ko"), "x", "6.1.0 SMP", True, [KlpObject("vmlinux")], True, False, "ab", {})
    >>> print(sidecar_text(pm), end="")
    name=x
    objects=vmlinux
    replace=1
    sha256=ab
    vermagic=6.1.0 SMP
    """
    rep = "" if pm.replace is None else str(int(pm.replace))
    return (f"name={pm.name}\nobjects={' '.join(pm.object_names)}\nreplace={rep}\nsha256={pm.sha256}\n"
            f"vermagic={pm.vermagic}\n")


@dataclass
class InstalledPatch:
    """One installed patch: where, for which release, by which means (``store`` or ``package``)."""

    name: str
    release: str
    path: Path
    via: str
    order: int


def install_module(pm: PatchModule, root: Path, release: str) -> Path:
    """Copy ``pm`` into the store for ``release`` (replacing an older copy of the same name) and append it to
    ``load-order``; returns the installed ``.ko`` path. Each file is written atomically."""
    d = store_dir(root, release)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{d}: cannot create ({e.strerror})") from None
    dest = d / f"{pm.name}.ko"
    atomic_write(dest, pm.path.read_bytes(), mode=0o644)
    atomic_write(d / f"{pm.name}.klp", sidecar_text(pm), mode=0o644)
    meta = pm.to_json()
    meta["path"] = str(dest)
    meta["installed_from"] = str(pm.path)
    atomic_write(d / f"{pm.name}.json", json.dumps(meta, indent=1) + "\n", mode=0o644)
    order_f = d / "load-order"
    names = [n for n in (order_f.read_text().split() if order_f.is_file() else []) if n != pm.name]
    atomic_write(order_f, "".join(f"{n}\n" for n in [*names, pm.name]), mode=0o644)
    return dest


def installed(root: Path, release: str | None = None) -> list[InstalledPatch]:
    """Installed patches (all releases, or one), store first in load order, then packaged ones by name."""
    out: list[InstalledPatch] = []
    for sub, via in ((STORE, "store"), (PACKAGED, "package")):
        base = root / sub
        if not base.is_dir():
            continue
        for rd in sorted(p for p in base.iterdir() if p.is_dir()):
            if release is not None and rd.name != release:
                continue
            kos = {p.name.removesuffix(".ko"): p for p in rd.glob("*.ko")}
            order_f = rd / "load-order"
            order = [n for n in (order_f.read_text().split() if order_f.is_file() else []) if n in kos]
            order += sorted(n for n in kos if n not in order)
            out.extend(InstalledPatch(n, rd.name, kos[n], via, i) for i, n in enumerate(order))
    return out
