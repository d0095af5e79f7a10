"""What is left of the tree journal, and tree fingerprints for tests.

``klpforge build`` no longer patches the user's tree (it compiles from private copies,
:mod:`klpforge.kbuild.overlay`), so nothing needs restoring. Older versions applied the patch in place and kept
a journal of the original files under the cache (``$KLPFORGE_CACHE/restore/<hash>/``); a build killed by
SIGKILL left it behind. :func:`check_old_journal` deals with such a journal once, without ever writing to
the tree: if the tree matches the saved originals the journal is simply removed; otherwise the build stops
and names the files that differ, because only the user can tell a leftover patch from a later edit.

>>> check_old_journal(Path("/nonexistent"))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import cache_dir

__all__ = ["check_old_journal", "journal_dir", "tree_manifest"]


def journal_dir(src: Path) -> Path:
    """Where klpforge <= 0.x journalled tree ``src`` (under the klpforge cache)."""
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:16]
    return cache_dir("restore", key)


def check_old_journal(src: Path) -> None:
    """Remove an old journal of ``src`` if the tree holds exactly the saved originals; otherwise raise
    :class:`InputError` listing the files that differ (nothing in the tree is touched either way)."""
    journal = journal_dir(src)
    try:
        manifest = json.loads((journal / "manifest.json").read_text())
    except (OSError, ValueError):
        return
    differ: list[str] = []
    for i, ent in enumerate(manifest.get("files", [])):
        target = Path(manifest.get("src", str(src))) / ent["path"]
        if ent.get("existed"):
            try:
                same = target.read_bytes() == (journal / f"{i}.orig").read_bytes()
            except OSError:
                same = False
        else:
            same = not (target.exists() or target.is_symlink())
        if not same:
            differ.append(ent["path"])
    if differ:
        raise InputError(f"an older klpforge build of {src} was killed while its patch was applied; these files "
                         f"differ from the originals it saved in {journal}: {', '.join(differ[:10])}; check them "
                         f"(the saved copies are the N.orig files, in manifest.json order), then delete {journal}")
    shutil.rmtree(journal, ignore_errors=True)


def tree_manifest(root: Path, reuse: dict[str, tuple[int, int, str, int, int]] | None = None
                  ) -> dict[str, tuple[int, int, str, int, int]]:
    """Relative path -> (mode, mtime ns, content SHA-1 / ``->target`` of a symlink / "" for a directory,
    ctime ns, inode) for every entry under ``root`` (``"."`` for ``root``); used by the tests to prove a
    tree untouched, directory mtimes included.

    The ctime is part of the record because no system call can set it back: restoring a file's bytes and
    mtime after writing it still shows. It also makes ``reuse`` (an earlier manifest of the same tree)
    safe: an entry whose inode, ctime and mode are unchanged keeps its digest without being read again.
    """
    out: dict[str, tuple[int, int, str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            old = reuse.get(rel) if reuse else None
            if old is not None and old[3:] == (st.st_ctime_ns, st.st_ino) and old[0] == st.st_mode:
                digest = old[2]
            elif os.path.islink(p):
                digest = "->" + os.readlink(p)
            elif name in filenames:
                with open(p, "rb") as f:
                    digest = hashlib.file_digest(f, "sha1").hexdigest()
            else:
                digest = ""
            out[rel] = (st.st_mode, st.st_mtime_ns, digest, st.st_ctime_ns, st.st_ino)
    st = os.stat(root)
    out["."] = (st.st_mode, st.st_mtime_ns, "", st.st_ctime_ns, st.st_ino)
    return out
