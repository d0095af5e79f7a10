"""Impact analysis: which functions a live patch must replace, given GCC's inlining and cloning.

Python API (used by ``klpforge impact`` and ``klpforge diff --impact``)::

    from klpforge.ipa import predict
    res = predict([Path("build")], ["helper"], objects=None)
    res.functions        # {'caller_a', 'caller_b'}
    res.reasons("caller_a")[0].chain[0].text()   # "`helper` inlined into `caller_a` (inline.c:29)"
"""

from __future__ import annotations

import os
from pathlib import Path

from .closure import MODES, Entry, ImpactResult, Step, closure_all, impact
from .dumps import find_dumps
from .index import Index, load_index

__all__ = ["predict", "ImpactResult", "Entry", "Step", "Index", "load_index", "find_dumps", "impact",
           "closure_all", "MODES"]


def predict(dumps: list[Path] | list[str] | str | os.PathLike[str], changed: list[str],
            objects: str | os.PathLike[str] | None = None, use_cache: bool = True) -> ImpactResult:
    """Functions to replace when the functions named in ``changed`` (``name`` or ``file.c:name``) change.

    ``dumps``: dump files, directories holding them, or list files. ``objects``: directory of the ELF
    objects when they are not beside the dumps.

    >>> predict("build/", ["helper"]).functions  # doctest: +SKIP
    {'caller_a', 'caller_b'}
    """
    specs: list[str | os.PathLike[str]] = (
        [dumps] if isinstance(dumps, (str, os.PathLike)) else list(dumps))
    files: list[Path] = []
    for s in specs:
        files += find_dumps(s)
    root = Path(specs[0]) if len(specs) == 1 and Path(specs[0]).is_dir() else None
    idx = load_index(files, Path(objects) if objects else None, root, use_cache=use_cache)
    return impact(idx, changed)
