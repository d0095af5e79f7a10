"""The ELF layer: read and write relocatable objects of every class and byte order.

One module per concept: :mod:`.constants`, :mod:`.types` (numpy record layouts), :mod:`.file` (reader),
:mod:`.writer` (relocatable object writer), :mod:`.symtab` (symbol tables of the patched target).
"""

from .file import ElfFile, Group, cstring_at
from .writer import ObjectWriter

__all__ = ["ElfFile", "Group", "ObjectWriter", "cstring_at"]
