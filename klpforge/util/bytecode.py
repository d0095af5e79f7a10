"""Run klpforge from byte-code however it is installed.

Python compiles a module's source on every import unless it finds a current ``.pyc``; it writes one
beside the source (``__pycache__/``) only when it may (``PYTHONDONTWRITEBYTECODE`` unset) and can (the
directory writable). An editable install in a read-only checkout, or a machine that sets
``PYTHONDONTWRITEBYTECODE=1``, would recompile klpforge's modules in every process: as much CPU as a
small object's whole diff when a driver runs one ``klpforge diff`` per object. Then the command-line entry
points (:mod:`klpforge.cli`, :mod:`klpforge.__main__`) call :func:`enable` before importing the commands,
and Python keeps the byte-code in ``<cache>/pycache`` (``sys.pycache_prefix``, as ``PYTHONPYCACHEPREFIX``
would; cache: :func:`klpforge.util.fsutil.cache_root`), never in the source tree. It does nothing when the
installation already has current byte-code (pip writes it; ``scripts/setup.sh`` runs ``compileall``), when
Python may write it beside the sources, when the user set ``PYTHONPYCACHEPREFIX`` or ``KLPFORGE_NO_PYCACHE``,
or when the cache directory is not private to the user (byte-code is code: another user must not be able
to plant it).

>>> enable()   # doctest: +SKIP
PosixPath('/home/u/.cache/klpforge/pycache')
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["enable", "needs_prefix"]

PACKAGE = Path(__file__).resolve().parent.parent


def _current(src: Path) -> bool:
    """Is there a ``.pyc`` beside ``src`` at least as new as the source?"""
    try:
        return os.stat(importlib.util.cache_from_source(str(src))).st_mtime >= os.stat(src).st_mtime
    except OSError:
        return False


def needs_prefix(package: Path = PACKAGE) -> bool:
    """True when Python would compile ``package``'s modules from source in every process: no current
    byte-code beside them (judged by the modules every command imports: the package's ``__init__`` and
    :mod:`klpforge.cli`), and Python may not or cannot write it there."""
    if sys.pycache_prefix is not None or os.environ.get("KLPFORGE_NO_PYCACHE"):
        return False
    if all(_current(package / name) for name in ("__init__.py", "cli.py")):
        return False
    pyc_dir = package / "__pycache__"
    writable = os.access(pyc_dir if pyc_dir.is_dir() else package, os.W_OK)
    return sys.dont_write_bytecode or not writable


def enable(package: Path = PACKAGE) -> Path | None:
    """Point Python's byte-code cache at ``<cache>/pycache`` when :func:`needs_prefix`; returns that
    directory, or None when nothing was changed. Never raises: without a usable cache Python simply
    compiles from source as before."""
    if not needs_prefix(package):
        return None
    from .errors import InputError
    from .fsutil import cache_root, check_private_dir

    try:
        root = cache_root()
        if not root.is_dir():
            return None  # byte-code alone never creates the cache
        prefix = root / "pycache"
        check_private_dir(root, walk=False)  # the cache and every ancestor: nobody else may plant a .pyc
        prefix.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(prefix)
        if not os.path.isdir(prefix) or os.path.islink(prefix) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None  # not private: compiling from source is slower, never unsafe
    except (OSError, RuntimeError, InputError):
        return None
    sys.pycache_prefix = str(prefix)
    sys.dont_write_bytecode = False  # written only under the private prefix, never beside the sources
    return prefix
