"""Keep a user's kernel tree byte-for-byte intact while a patch is applied to it.

:class:`TreeGuard` saves every file the patch touches (content, mode and mtime, so ``make`` sees nothing
changed either) to a journal outside the tree before the patch is applied, and puts them back on success,
failure, Ctrl-C or SIGTERM/SIGHUP. If the process is killed outright (SIGKILL, power loss), the journal is
still there and the next ``klpforge build`` on that tree restores it first.

>>> with TreeGuard(Path("linux"), ["fs/proc/cmdline.c"]) as guard:   # doctest: +SKIP
...     patch.apply(Path("linux"))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType

from .prepare import cache_root

__all__ = ["TreeGuard", "recover_tree", "tree_checksum", "journal_dir"]


def journal_dir(src: Path) -> Path:
    """Journal directory for tree ``src`` (outside the tree, under the klpforge cache)."""
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "restore" / key


def _restore_from(journal: Path) -> list[str]:
    manifest = json.loads((journal / "manifest.json").read_text())
    src = Path(manifest["src"])
    restored: list[str] = []
    for i, ent in enumerate(manifest["files"]):
        target = src / ent["path"]
        if ent["existed"]:
            saved = journal / f"{i}.orig"
            data = saved.read_bytes()
            try:
                same = target.read_bytes() == data
            except OSError:
                same = False
            if not same:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.klpforge-restore")
                tmp.write_bytes(data)
                os.replace(tmp, target)
                restored.append(ent["path"])
            os.chmod(target, ent["mode"])
            os.utime(target, ns=(ent["atime_ns"], ent["mtime_ns"]))
        elif target.exists() or target.is_symlink():
            target.unlink()
            restored.append(ent["path"])
            for d in ent.get("made_dirs", []):
                try:
                    (src / d).rmdir()
                except OSError:
                    pass
    # Directory mtimes too (patch(1) renames files into place), so nothing looks touched.
    for rel, (atime, mtime) in manifest.get("dirs", {}).items():
        try:
            os.utime(src / rel, ns=(atime, mtime))
        except OSError:
            pass
    return restored


def recover_tree(src: Path) -> list[str]:
    """Restore ``src`` from a journal left by a killed build; return the paths put back (empty if none).

    >>> recover_tree(Path("/nonexistent"))
    []
    """
    journal = journal_dir(src)
    if not (journal / "manifest.json").is_file():
        return []
    restored = _restore_from(journal)
    shutil.rmtree(journal, ignore_errors=True)
    return restored


class _Terminate(BaseException):
    """Raised from a SIGTERM/SIGHUP handler so ``finally`` blocks run."""


class TreeGuard:
    """Context manager: journal ``paths`` of ``src`` on entry, restore them on exit (always)."""

    def __init__(self, src: Path, paths: Iterable[str]):
        self.src = src.resolve()
        self.paths = list(dict.fromkeys(paths))
        self.journal = journal_dir(self.src)
        self._old: dict[int, object] = {}

    def __enter__(self) -> TreeGuard:
        recover_tree(self.src)
        self.journal.mkdir(parents=True, exist_ok=True)
        files = []
        for i, rel in enumerate(self.paths):
            p = self.src / rel
            if p.is_file():
                st = p.stat()
                shutil.copyfile(p, self.journal / f"{i}.orig")
                files.append({"path": rel, "existed": True, "mode": st.st_mode & 0o7777,
                              "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns})
            else:
                made, d = [], p.parent
                while not d.exists() and d != self.src:
                    made.append(str(d.relative_to(self.src)))
                    d = d.parent
                files.append({"path": rel, "existed": False, "made_dirs": made})
        dirs = {}
        for rel in self.paths:
            d = (self.src / rel).parent
            while d.is_dir() and d != self.src.parent:
                st = d.stat()
                dirs[str(d.relative_to(self.src))] = [st.st_atime_ns, st.st_mtime_ns]
                if d == self.src:
                    break
                d = d.parent
        tmp = self.journal / "manifest.json.tmp"
        tmp.write_text(json.dumps({"src": str(self.src), "files": files, "dirs": dirs}))
        os.replace(tmp, self.journal / "manifest.json")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: rely on the journal
                break
        return self

    @staticmethod
    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        raise _Terminate(f"signal {signum}")

    def restore(self) -> list[str]:
        """Put the tree back now (idempotent); signals are held off while files are rewritten."""
        if not (self.journal / "manifest.json").is_file():
            return []
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            restored = _restore_from(self.journal)
            shutil.rmtree(self.journal, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return restored

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.restore()
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
        if isinstance(ev, _Terminate):
            sys.exit(143)


def tree_checksum(root: Path, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over every regular file's relative path, mode and content under ``root`` (sorted).

    Used by the tests to prove a tree is unchanged. Skips top-level entries named in ``exclude``.

    >>> len(tree_checksum(Path("/nonexistent")))
    64
    """
    h = hashlib.sha256()
    skip = set(exclude)
    if not root.is_dir():
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel_dir == "." and name in skip:
                continue
            st = os.lstat(p)
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            else:
                with open(p, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha1").digest())
            h.update(b"\n")
    return h.hexdigest()
