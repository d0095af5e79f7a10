"""Which objects a live-patch module patches, read from the ``.ko`` before it is booted.

``verify`` needs them to load a shipped module the patch targets, and to say which one is missing; the guest
then checks the kernel's own view (``/sys/kernel/livepatch/<patch>/<object>/patched``, Linux 6.1
``kernel/livepatch/core.c``), which holds for any live patch, whoever built it.

Read by :func:`klpforge.host.inspect.inspect_module` (one reader for ``verify`` and the host commands);
sources, best first:

1. the static ``klp_object`` array a klpforge module carries (``klpforge_objs``, written by
   :func:`klpforge.kbuild.module.module_source`): each entry's ``name`` (NULL = vmlinux) and ``funcs``
   pointers are relocations, so the names are read through them (``struct klp_object``/``struct klp_func`` of
   Linux 6.1 ``include/linux/livepatch.h``: ``name`` and ``old_name`` are the first members, ``funcs`` and
   ``new_func`` the second; the entry size is the array size over the entries counted, terminator included);
2. otherwise the objects named by ``.klp.rela.<object>.<section>`` sections and ``.klp.sym.<object>.<name>,<pos>``
   symbols (any livepatch module with klp relocations; its functions are then unknown).

>>> [t.name for t in patch_targets(Path("livepatch-nfsd-fix.ko"))]   # doctest: +SKIP
['vmlinux', 'nfsd']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..host.inspect import inspect_module
from ..util.errors import InputError

__all__ = ["PatchTarget", "patch_targets", "module_targets"]


@dataclass
class PatchTarget:
    """One ``klp_object``: ``name`` is ``vmlinux`` or a module name (``_`` as the kernel spells it); ``funcs``
    the replaced functions (``name`` or ``name,sympos``); ``known`` is False when the functions could not be
    read (source 2 above)."""

    name: str
    funcs: list[str] = field(default_factory=list)
    known: bool = True


def patch_targets(ko: Path) -> list[PatchTarget]:
    """The objects ``ko`` patches (see the module docstring for the sources; read by
    :func:`klpforge.host.inspect.inspect_module`); ``[]`` when nothing says.

    Raises :class:`InputError` when ``ko`` is not a readable kernel module."""
    mod = inspect_module(ko)
    known = mod.source == "klpforge"
    return [PatchTarget(o.name.replace("-", "_"), [f"{f.name},{f.sympos}" if f.sympos else f.name for f in o.funcs],
                        known) for o in mod.objects]


def module_targets(ko: Path) -> list[str]:
    """The module names (not vmlinux) among :func:`patch_targets` that have functions or whose functions are
    unknown: the modules that must be loaded for the patch to do anything to them. ``[]`` for a file that is
    not a readable module (``verify`` refuses it later, with its own message)."""
    try:
        targets = patch_targets(ko)
    except InputError:
        return []
    return [t.name for t in targets if t.name != "vmlinux" and (t.funcs or not t.known)]
