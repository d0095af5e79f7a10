"""Kernel-tree side of klpforge: prepare a test kernel, rebuild patched objects, build the module.

Modules: :mod:`.prepare` (``klpforge kernel prepare``), :mod:`.tree` (a built tree, its recorded
commands and link parents), :mod:`.patchfile`, :mod:`.restore` (the tree is always put back),
:mod:`.structsizes`, :mod:`.module` (livepatch module source + Kbuild), :mod:`.pipeline`
(``klpforge build``).
"""

__all__: list[str] = []
