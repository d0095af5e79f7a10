"""The source-based way (issue 19): hand-written or extracted live patch sources.

- :mod:`klpforge.source.convert`: a linked livepatch module's references to non-exported symbols become
  klp relocations (what the kernel's never-merged ``klp-convert`` proposal did).
"""

__all__: list[str] = []
