"""File helpers: outputs appear whole or not at all, with the user's umask; cache directories nobody else
can write; inputs that are regular files of a sane size.

>>> atomic_write("/tmp/x.txt", "hello\\n")
>>> check_private_dir("/tmp/no/such/dir")
"""

from __future__ import annotations

import fcntl
import functools
import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

__all__ = ["atomic_write", "scratch_dir", "umask", "check_private_dir", "check_regular_file", "open_regular",
           "tree_lock", "MiB", "GiB", "cache_root", "cache_dir"]

MiB = 1 << 20
GiB = 1 << 30


def umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` ``Umask:``, Linux >= 4.7);
    falls back to setting and restoring it, which is not thread-safe, only where /proc lacks the field."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - /proc always has it on supported kernels
        pass
    old = os.umask(0o022)  # pragma: no cover
    os.umask(old)  # pragma: no cover
    return old  # pragma: no cover


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename.

    A crash or Ctrl-C leaves either the old file or none, never a partial one. The file gets ``mode``
    if given, else ``0666`` less the umask -- what ``gcc -o`` and ``ld -o`` give an object (``mkstemp``
    alone would leave ``0600``).
    """
    target = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            os.fchmod(f.fileno(), mode if mode is not None else 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_is_private(gid: int, uid: int) -> bool:
    """A group only ``uid`` belongs to (Debian's user private groups, umask 002): its write bit is no
    one else's. The same exception OpenSSH's ``secure_permissions`` makes."""
    try:
        g = grp.getgrgid(gid)
    except KeyError:
        return False
    name = _user(uid)
    return all(m == name for m in g.gr_mem) and g.gr_name == name


def _why_unsafe(p: str, st: os.stat_result, uid: int, ancestor: bool) -> str | None:
    """The reason ``p`` (already lstat'ed) may be changed by someone other than ``uid`` or root, or None."""
    if st.st_uid not in (uid, 0):
        return f"is owned by {_user(st.st_uid)}, not by {_user(uid)}" + (" or root" if uid else "")
    mode = stat.S_IMODE(st.st_mode)
    if ancestor and mode & stat.S_ISVTX and st.st_uid == 0:
        return None  # /tmp: others may add entries, not replace ours (ssh accepts it the same way)
    if mode & stat.S_IWOTH:
        return f"is writable by other users (mode {mode:04o})"
    if mode & stat.S_IWGRP and not _group_is_private(st.st_gid, uid):
        return f"is writable by group {_group(st.st_gid)} (mode {mode:04o})"
    return None


def _fix(why: str, d: str) -> str:
    return f"chown {_user(os.geteuid())} {d}" if why.startswith("is owned") else f"chmod go-w {d}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@functools.lru_cache(maxsize=64)
def _checked(path: str, walk: bool, uid: int) -> None:
    """Memoised for one process: a command checks each cache directory once."""
    p = os.path.abspath(path)
    # every ancestor, as ssh does for ~/.ssh/authorized_keys: whoever can rename a parent can swap the tree
    anc = os.path.dirname(p)
    while True:
        try:
            st = os.stat(anc)
        except FileNotFoundError:
            st = None  # created later, by us, with the umask
        why = st and _why_unsafe(anc, st, uid, ancestor=True)
        if why:
            raise InputError(f"unsafe cache directory {anc}: it {why}; klpforge runs and compiles what the cache "
                             f"holds (fix: {_fix(why, anc)}, or set KLPFORGE_CACHE elsewhere)")
        if anc == "/":
            break
        anc = os.path.dirname(anc)
    if not os.path.lexists(p):
        return
    stack = [p]
    while stack:
        d = stack.pop()
        st = os.lstat(d)
        why = _why_unsafe(d, st, uid, ancestor=False)
        if why:
            raise InputError(f"unsafe cache directory {d}: it {why}; klpforge runs and compiles what the cache "
                             f"holds (fix: {_fix(why, d)}, or remove it)")
        if not walk or not stat.S_ISDIR(st.st_mode) or st.st_nlink == 2:
            continue  # nlink 2: no subdirectory (ext4, xfs, tmpfs; btrfs says 1 and is listed)
        try:
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError as e:
            raise InputError(f"cache directory {d}: {e.strerror}") from None


def check_private_dir(path: str | os.PathLike[str], walk: bool = True) -> None:
    """Refuse a cache directory someone other than the user (or root) could write.

    ``path`` and, with ``walk``, every directory below it (symbolic links are not followed) must be owned by
    the user or root and not writable by others, nor by a group other than the user's private group; every
    ancestor up to ``/`` must be too, except root-owned sticky directories such as ``/tmp``. A missing
    ``path`` only has its ancestors checked. What klpforge runs or compiles comes from here (Debian packages,
    prepared trees, build roots, the test kernel), often as root: a directory another user can write is
    code execution, so it is refused the way OpenSSH refuses an ``authorized_keys`` with loose modes.

    Raises :class:`InputError` with one line naming the directory and the reason. Costs one ``lstat`` per
    directory (about 5,000 for a prepared kernel tree, ~0.1 s warm) once per process.
    """
    _checked(str(path), walk, os.geteuid())


def check_regular_file(label: str, path: str | os.PathLike[str], limit: int | None = None,
                       kind: str = "file") -> None:
    """Refuse an input that is not a regular file (``kind="file"``) or directory (``kind="dir"``), or a
    regular file larger than ``limit`` bytes.

    A FIFO would block the read for ever, ``/dev/zero`` would be read until memory runs out, a character
    device may have side effects: they are refused by what ``stat`` says before the file is opened.
    Raises :class:`InputError`: ``--symtab /dev/zero: not a regular file (character device)``.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{label} {p}: no such file or directory") from None
    except OSError as e:
        raise InputError(f"{label} {p}: {e.strerror}") from None
    if kind == "dir":
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{label} {p}: not a directory")
        return
    if stat.S_ISDIR(st.st_mode):
        if kind == "any":
            return
        raise InputError(f"{label} {p}: is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{label} {p}: not a regular file ({_ftype(st.st_mode)})")
    if limit is not None and st.st_size > limit:
        raise InputError(f"{label} {p}: {st.st_size / MiB:,.0f} MiB is larger than the {_size(limit)} such a "
                         "file can sensibly be")


def open_regular(path: str | os.PathLike[str], limit: int | None = None) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (of at most ``limit`` bytes).

    For the files a command finds itself (dumps in a directory, objects, names in a list): opened with
    ``O_NONBLOCK`` so a FIFO does not block the ``open``, then refused by ``fstat`` of the open file (no race
    with a rename). Raises :class:`InputError` ``PATH: not a regular file (a FIFO)``; ``OSError`` as ``open``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{os.fspath(path)}: not a regular file ({_ftype(st.st_mode)})")
        if limit is not None and st.st_size > limit:
            raise InputError(f"{os.fspath(path)}: {st.st_size / MiB:,.0f} MiB is larger than the {_size(limit)} "
                             "such a file can sensibly be")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _ftype(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"  # pragma: no cover


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


@contextmanager
def tree_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if needed) for the duration: one writer per prepared tree
    (a distribution tree, a build root, the test kernel), readers with ``shared``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def scratch_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A new private temporary directory (under ``$TMPDIR``), removed when the block ends however it ends,
    unless ``keep``.

    SIGINT/SIGTERM/SIGHUP are held from before the directory exists until its removal is certain, so a
    signal at any moment (klpforge turns them into exceptions, :mod:`klpforge.util.proc`) never leaves it behind.

    >>> with scratch_dir("klpforge-impact-") as work:
    ...     (work / "a.o").write_bytes(b"")
    """
    held = threading.current_thread() is threading.main_thread()
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if held else None
    d: Path | None = None
    try:
        d = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held signal is raised here: d is removed
            old = None
        yield d
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if d is not None and not keep:
            shutil.rmtree(d, ignore_errors=True)


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Directory under which prepared kernels live.

    ``cache`` wins, then ``$KLPFORGE_CACHE``, then ``$XDG_CACHE_HOME/klpforge``, then ``~/.cache/klpforge``.

    >>> cache_root("/tmp/c")
    PosixPath('/tmp/c')
    """
    if cache:
        return Path(cache).expanduser().resolve()
    if os.environ.get("KLPFORGE_CACHE"):
        return Path(os.environ["KLPFORGE_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "klpforge").resolve()


def cache_dir(*parts: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """``cache_root(cache) / parts``, refused unless only the user (or root) can write it, everything
    below it and every directory above it (:func:`check_private_dir`): klpforge compiles
    and runs what the cache holds. Raises :class:`InputError` naming the directory and the reason.

    >>> cache_dir("kernel-6.1", cache="/tmp/no-such-cache")
    PosixPath('/tmp/no-such-cache/kernel-6.1')
    """
    d = cache_root(cache).joinpath(*parts)
    check_private_dir(d)
    return d
