"""What ``klpforge install|load|unload|list|info`` do, on top of the inspect/sysfs/store/unit modules.

``load``/``unload`` run the shell loader (:func:`klpforge.host.unit.loader_path`) after their own checks, so
the boot unit, the package scripts and the CLI share one insmod/transition/rmmod implementation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..util.errors import InputError, UnsafeChange
from ..util.fsutil import atomic_write
from ..util.proc import run
from .checks import load_reasons, release_reasons
from .inspect import PatchModule, inspect_module
from .store import InstalledPatch, install_module, installed
from .sysfs import KernelState, read_state
from .unit import UNIT_NAME, loader_script, unit_text

__all__ = ["load", "unload", "install", "PatchRow", "patch_rows", "find_patch", "info_json", "LOADER_BIN",
           "UNIT_DIR", "run_loader"]

#: where ``install`` puts the loader and the unit (under ``--root``)
LOADER_BIN = "usr/local/lib/klpforge/klpforge-load"
UNIT_DIR = "etc/systemd/system"


def _refusal(reasons: list[str]) -> str:
    """One line for every reason (one ``UnsafeChange`` reason: the CLI prints it whole).

    >>> _refusal(["a: built for kernel 1, not 2", "b"])
    'refused: a: built for kernel 1, not 2; b'
    """
    return "refused: " + "; ".join(reasons)


def run_loader(args: list[str]) -> int:
    """Run the shell loader with ``args``; its lines go straight to our stdout/stderr."""
    from .unit import loader_path

    sh = shutil.which("sh") or "/bin/sh"
    return run([sh, str(loader_path()), *args]).returncode


def load(ko: Path, timeout: int, defer: bool = False) -> int:
    """Check ``ko`` against the running kernel, then insmod it and wait for the transition (the loader).

    Raises :class:`UnsafeChange` (exit 2) naming every reason it may not load; returns the loader's code
    (0 loaded, 1 insmod failed or the transition timed out and was reversed)."""
    pm = inspect_module(ko)
    reasons = load_reasons(pm, read_state(Path("/")), defer)
    if reasons:
        raise UnsafeChange(_refusal(reasons))
    args = ["load", "--timeout", str(timeout), "--objects", " ".join(pm.object_names)]
    return run_loader([*args, *(["--defer"] if defer else []), str(ko)])


def unload(name: str, timeout: int) -> int:
    """Disable ``name`` (a module name or an installed/loaded patch's file), wait, rmmod."""
    if name.endswith(".ko") and Path(name).is_file():
        name = inspect_module(Path(name)).name
    return run_loader(["unload", "--timeout", str(timeout), name.replace("-", "_")])


def install(ko: Path, root: Path, release: str | None, unit: bool, before: list[str]) -> tuple[Path, Path | None]:
    """Check ``ko`` against ``release`` (default: the running kernel's), copy it into the store, install the
    loader and the boot unit (unless ``unit`` is false); returns (installed module, unit file or None)."""
    pm = inspect_module(ko)
    rel = release or read_state(Path("/")).release
    reasons = release_reasons(pm, rel)
    if reasons:
        raise UnsafeChange(_refusal(reasons))
    dest = install_module(pm, root, rel)
    unit_path = None
    if unit:
        loader = root / LOADER_BIN
        loader.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(loader, loader_script(), mode=0o755)
        unit_path = root / UNIT_DIR / UNIT_NAME
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(unit_path, unit_text(f"/{LOADER_BIN} boot", "Load the live patches installed for the "
                                          "running kernel (klpforge)", before), mode=0o644)
        wants = root / UNIT_DIR / "sysinit.target.wants" / UNIT_NAME
        wants.parent.mkdir(parents=True, exist_ok=True)
        if not wants.is_symlink():
            os.symlink(f"/{UNIT_DIR}/{UNIT_NAME}", wants)  # what `systemctl enable` does, root-relative
    return dest, unit_path


@dataclass
class PatchRow:
    """One line of ``klpforge list``: an installed and/or loaded patch."""

    name: str
    release: str
    installed: str  # "store", "package", or "" (loaded only)
    state: str  # enabled, disabled, transition, replaced (loaded, no longer active), not loaded
    objects: str  # "vmlinux:patched kobject_example:waiting"
    replace: bool | None
    replaces: list[str]
    path: str

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


def _state_word(name: str, st: KernelState) -> str:
    p = st.patches.get(name)
    if p is None:
        return "replaced" if name in st.livepatch_modules else "not loaded"
    if p.transition:
        return "transition"
    return "enabled" if p.enabled else "disabled"


def patch_rows(root: Path, all_releases: bool = False) -> list[PatchRow]:
    """Installed patches (for the running release, or all) and loaded ones, with state and replacements.

    A cumulative patch (``replace``) replaces every patch applied before it: installed ones earlier in the
    load order, and loaded ones the kernel has already dropped from ``/sys/kernel/livepatch`` (``replaced``).
    """
    st = read_state(root)
    rows: list[PatchRow] = []
    seen: set[str] = set()
    inst = installed(root, None if all_releases else st.release)
    infos: dict[tuple[str, str], PatchModule | None] = {}
    for ip in inst:
        try:
            infos[(ip.release, ip.name)] = inspect_module(ip.path)
        except InputError:
            infos[(ip.release, ip.name)] = None
    for ip in inst:
        pm = infos[(ip.release, ip.name)]
        name = pm.name if pm else ip.name
        running = ip.release == st.release
        rows.append(PatchRow(name, ip.release, ip.via, _state_word(name, st) if running else "other kernel",
                             _objects_text(name, st, pm), pm.replace if pm else None, [], str(ip.path)))
        if running:
            seen.add(name)
    for name in [*st.patches, *st.livepatch_modules]:
        if name not in seen:
            seen.add(name)
            p = st.patches.get(name)
            rows.append(PatchRow(name, st.release, "", _state_word(name, st), _objects_text(name, st, None),
                                 p.replace if p else None, [], ""))
    _link_replacements(rows, st)
    return rows


def _objects_text(name: str, st: KernelState, pm: PatchModule | None) -> str:
    p = st.patches.get(name)
    if p is not None:
        parts = []
        for o in p.objects:
            word = "" if o.patched is None else (":patched" if o.patched else ":waiting")
            parts.append(f"{o.name}{word}")
        return " ".join(parts)
    return " ".join(pm.object_names) if pm else ""


def _link_replacements(rows: list[PatchRow], st: KernelState) -> None:
    """Fill ``replaces``: installed patches by load order within a release (a replace patch replaces the
    earlier ones); loaded ones by what the kernel did. A ``replaced`` module (still loaded, gone from
    /sys/kernel/livepatch) was replaced by a cumulative patch loaded after it; Linux 6.1 keeps only patches
    loaded after the last cumulative one in its list (``klp_free_replaced_patches``), so that patch is the
    earliest-loaded active one: the last of them in /proc/modules, which lists the newest module first."""
    by_rel: dict[str, list[PatchRow]] = {}
    for r in rows:
        by_rel.setdefault(r.release, []).append(r)
    for group in by_rel.values():
        for i, r in enumerate(group):
            if r.replace and r.installed:
                r.replaces = [g.name for g in group[:i] if g.installed and g.name != r.name]
    replaced = [r for r in rows if r.state == "replaced"]
    active = [r for r in rows if r.release == st.release and r.name in st.patches]
    if replaced and active:
        order = {m: i for i, m in enumerate(st.modules)}
        replacer = max(active, key=lambda r: order.get(r.name, -1))
        replacer.replace = True if replacer.replace is None else replacer.replace
        replacer.replaces = list(dict.fromkeys([*replacer.replaces, *(r.name for r in replaced)]))


def find_patch(name: str, root: Path) -> tuple[PatchModule | None, InstalledPatch | None, KernelState]:
    """The patch ``name`` (module name, file stem or a ``.ko`` path): its file if installed or given."""
    st = read_state(root)
    if name.endswith(".ko"):
        p = Path(name)
        if not p.is_file():
            raise InputError(f"{name}: no such file")
        return inspect_module(p), None, st
    norm = name.replace("-", "_")
    # the running release's copy first, then any release's
    for ip in sorted(installed(root, None), key=lambda ip: ip.release != st.release):
        if ip.name.replace("-", "_") == norm:
            return inspect_module(ip.path), ip, st
    if norm in st.patches or norm in st.livepatch_modules:
        return None, None, st
    raise InputError(f"{name}: no such live patch (not installed under {root}, not loaded)")


def info_json(name: str, root: Path) -> dict[str, Any]:
    """Everything ``klpforge info`` shows, as JSON."""
    pm, ip, st = find_patch(name, root)
    mod_name = pm.name if pm else name.replace("-", "_")
    out: dict[str, Any] = {"name": mod_name, "state": _state_word(mod_name, st)}
    if ip is not None:
        out["installed"] = {"via": ip.via, "release": ip.release, "path": str(ip.path)}
        meta = ip.path.with_suffix(".json")
        if meta.is_file():
            try:
                out["metadata"] = json.loads(meta.read_text())
            except ValueError:
                pass
    if pm is not None:
        out["module"] = pm.to_json()
    p = st.patches.get(mod_name)
    if p is not None:
        out["loaded"] = {"enabled": p.enabled, "transition": p.transition, "replace": p.replace,
                         "stack_order": p.stack_order,
                         "objects": [{"name": o.name, "patched": o.patched, "functions": o.funcs}
                                     for o in p.objects]}
    return out
