"""The diff engine: two relocatable objects in, the live patch object (or a refusal) out.

Its modules are the stages, in order, each with the helpers it owns beside it:

====================  ===========================================================================
shared layers         :mod:`.secnames`, :mod:`.names` (symbol/section name rules), :mod:`.arch`,
                      :mod:`.disasm` (per-architecture facts, capstone)
read                  :mod:`.model` (an object as numpy tables), :mod:`.symtab` (the target's
                      symbols), :mod:`.pcrel` (PC-relative references decoded)
correlate             :mod:`.correlate`, with :mod:`.statics` (function-scope statics)
compare               :mod:`.compare`, with :mod:`.reloc_keys` (what relocations point at),
                      :mod:`.lineargs` (``__LINE__`` arguments), :mod:`.sharedsec` (shared sections)
select                :mod:`.select`, with :mod:`.icf` (folded functions), :mod:`.ftrace_entry`
emit                  :mod:`.emit` (Linux livepatch object, Xen payload, carving, special sections,
                      post-link klp relocations)
driver                :mod:`.run` (:func:`run_diff`: the stages in order), :mod:`.report` (human
                      summary), :mod:`.impact_check` (``diff --impact``: the result against
                      :mod:`klpforge.ipa`'s prediction)
====================  ===========================================================================

Import direction: a stage imports only the stages before it and the shared layers; nothing here imports
the targets or backends (:mod:`klpforge.kbuild`, :mod:`klpforge.distro`, :mod:`klpforge.xen`,
:mod:`klpforge.qemu`) nor :mod:`klpforge.commands`; below the engine are only :mod:`klpforge.elf` and
:mod:`klpforge.util` (and :mod:`klpforge.ipa` for the ``--impact`` check). ``tests/test_layout.py`` checks it.

The public API is :func:`run_diff` (with :class:`DiffOptions`, :class:`DiffResult`,
:class:`PatchedFunc`), loaded on first use so that importing one stage does not import them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import DiffOptions, DiffResult, PatchedFunc, run_diff

__all__ = ["DiffOptions", "DiffResult", "run_diff", "PatchedFunc"]


def __getattr__(name: str) -> Any:
    """The public names of :mod:`.run`, imported when first asked for (PEP 562)."""
    if name in __all__:
        from . import run
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
