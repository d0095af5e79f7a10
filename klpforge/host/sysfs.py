"""The running kernel's live-patch state, read from sysfs and procfs under a root directory.

``root`` is ``/`` on a host; tests pass a directory holding a copy of a booted guest's files (the same
layout), so the parsing is checked against what a real kernel writes.

Files read (Documentation/ABI/testing/sysfs-kernel-livepatch; the version each appeared in):

* ``/sys/kernel/livepatch/<patch>/enabled`` (3.19), ``transition`` (4.12), ``signal`` (4.15 to 5.0: the
  fake signal on demand; later kernels send it themselves every 15 s), ``force`` (4.15), ``replace`` (6.11),
  ``stack_order`` (6.14); ``<patch>/<object>/patched`` (6.1); ``<patch>/<object>/<func>,<sympos>/``.
* ``/proc/modules`` (loaded modules), ``/sys/module/<mod>/taint`` (``K``: a live patch, TAINT_LIVEPATCH),
  ``/proc/sys/kernel/osrelease`` (the release, as ``uname -r``).
* Signature enforcement: ``/sys/module/module/parameters/sig_enforce`` (``Y``; CONFIG_MODULE_SIG) or a
  lockdown mode of ``integrity``/``confidentiality`` in ``/sys/kernel/security/lockdown`` (5.4+).

>>> read_state(Path("/")).release   # doctest: +SKIP
'6.1.0-56-amd64'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoadedObject", "LoadedPatch", "KernelState", "read_state", "LIVEPATCH_DIR"]

LIVEPATCH_DIR = "sys/kernel/livepatch"


@dataclass
class LoadedObject:
    """A ``klp_object`` of a loaded patch: ``patched`` is None before 6.1 (no such file)."""

    name: str
    patched: bool | None
    funcs: list[str] = field(default_factory=list)


@dataclass
class LoadedPatch:
    """One directory of ``/sys/kernel/livepatch``."""

    name: str
    enabled: bool
    transition: bool
    objects: list[LoadedObject]
    #: ``replace`` attribute (6.11+), None where the kernel does not say
    replace: bool | None = None
    #: ``stack_order`` (6.14+): 1 for the first patch applied
    stack_order: int | None = None
    #: the kernel still has the ``signal`` file (4.15 to 5.0)
    has_signal: bool = False


@dataclass
class KernelState:
    """What the kernel reports: release, live patches, loaded modules and which of them are live patches."""

    release: str
    patches: dict[str, LoadedPatch]
    modules: list[str]
    #: loaded modules tainted ``K`` (live patches), whether or not they are still in /sys/kernel/livepatch
    livepatch_modules: list[str]
    sig_enforced: bool
    #: the kernel has CONFIG_LIVEPATCH (``/sys/kernel/livepatch`` exists)
    livepatch_supported: bool


def _read(p: Path) -> str | None:
    try:
        return p.read_text(errors="replace").strip()
    except OSError:
        return None


def _flag(p: Path) -> bool | None:
    v = _read(p)
    return None if v is None else v in ("1", "Y")


def _patch(d: Path) -> LoadedPatch:
    objects = []
    for od in sorted(x for x in d.iterdir() if x.is_dir()):
        funcs = sorted(f.name for f in od.iterdir() if f.is_dir())
        objects.append(LoadedObject(od.name, _flag(od / "patched"), funcs))
    so = _read(d / "stack_order")
    return LoadedPatch(d.name, bool(_flag(d / "enabled")), bool(_flag(d / "transition")), objects,
                       _flag(d / "replace"), int(so) if so and so.isdigit() else None, (d / "signal").exists())


def read_state(root: Path = Path("/")) -> KernelState:
    """Read the state under ``root``; missing files read as absent (no livepatch support, no modules)."""
    import os

    release = _read(root / "proc/sys/kernel/osrelease")
    if release is None:
        release = os.uname().release if root == Path("/") else ""
    lp = root / LIVEPATCH_DIR
    patches = {d.name: _patch(d) for d in sorted(lp.iterdir()) if d.is_dir()} if lp.is_dir() else {}
    mods_text = _read(root / "proc/modules") or ""
    modules = [ln.split()[0] for ln in mods_text.splitlines() if ln.split()]
    klp = [m for m in modules if "K" in (_read(root / "sys/module" / m / "taint") or "")]
    lockdown = _read(root / "sys/kernel/security/lockdown") or ""
    sig = _read(root / "sys/module/module/parameters/sig_enforce") == "Y" or \
        "[integrity]" in lockdown or "[confidentiality]" in lockdown
    return KernelState(release, patches, modules, klp, sig, lp.is_dir())
