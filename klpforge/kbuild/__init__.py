"""Kernel-tree side of klpforge: prepare a test kernel, rebuild patched objects, build the module.

Modules: :mod:`.prepare` (``klpforge kernel prepare``), :mod:`.tree` (a built tree, its recorded
commands and link parents), :mod:`.patchfile`, :mod:`.overlay` (the patch applied to private
copies, compiled through a view of the tree: the user's tree is only read), :mod:`.restore` (an old
journal's one-time cleanup),
:mod:`.structsizes`, :mod:`.module` (livepatch module source + Kbuild), :mod:`.pipeline`
(``klpforge build``).
"""

__all__: list[str] = []
