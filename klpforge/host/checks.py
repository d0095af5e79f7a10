"""Checks before a live patch is installed or loaded: is it a live patch, for this kernel, with its targets.

Each check returns the reason a person reads; ``klpforge load``/``install`` refuse with exit 2 when any fails.
The kernel itself would refuse some of these at ``insmod`` with a terse errno (``Invalid module format`` for
a vermagic mismatch, ``kernel/module/main.c`` ``check_modinfo``); others it would accept silently (a patch for
a module that is not loaded waits for it in ``klp_module_coming``), which a user loading a fix by hand
rarely means: ``--defer`` allows it, and the boot unit always allows it (modules load later in boot).
"""

from __future__ import annotations

from .inspect import PatchModule
from .sysfs import KernelState

__all__ = ["release_reasons", "load_reasons", "missing_targets"]


def release_reasons(pm: PatchModule, release: str) -> list[str]:
    """Reasons ``pm`` does not fit a kernel ``release`` (not a live patch, another release).

    >>> from pathlib import Path
    >>> pm = PatchModule(Path("x.ko"), "x", "6.1.0-9 SMP", True, [], True, False, "", {})
    >>> release_reasons(pm, "6.1.0-10")
    ["x: built for kernel 6.1.0-9, not 6.1.0-10 (vermagic '6.1.0-9 SMP')"]
    """
    if not pm.livepatch:
        return [f"{pm.path}: not a livepatch module (no livepatch=Y in .modinfo)"]
    if pm.release != release:
        return [f"{pm.name}: built for kernel {pm.release or '?'}, not {release} (vermagic '{pm.vermagic}')"]
    return []


def missing_targets(pm: PatchModule, state: KernelState) -> list[str]:
    """Target modules of ``pm`` (not vmlinux) that are not loaded."""
    return [o for o in pm.object_names if o != "vmlinux" and o not in state.modules]


def load_reasons(pm: PatchModule, state: KernelState, defer: bool = False) -> list[str]:
    """Everything that stops ``pm`` loading into the kernel ``state`` describes."""
    reasons = release_reasons(pm, state.release)
    if reasons:
        return reasons
    if not state.livepatch_supported:
        reasons.append("the running kernel has no /sys/kernel/livepatch (CONFIG_LIVEPATCH is off)")
    if pm.name in state.livepatch_modules and pm.name not in state.patches:
        reasons.append(f"{pm.name}: module loaded but not an active live patch (replaced or disabled): "
                       f"unload it first")
    missing = missing_targets(pm, state)
    if missing and not defer:
        reasons.append(f"{pm.name}: target module(s) not loaded: {' '.join(missing)} (the kernel would patch "
                       "them when they load; use --defer to allow that)")
    if state.sig_enforced and not pm.signed:
        reasons.append(f"{pm.name}: the kernel enforces module signatures and {pm.path} is not signed")
    return reasons
