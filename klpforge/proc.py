"""Child processes that end with klpforge, and SIGTERM/SIGHUP as a clean, documented exit.

Every tool klpforge starts (gcc through ``sh -c``, ``make M=``, ``patch``, QEMU) runs in a process group of
its own and is registered here, so :func:`kill_children` can end it together with everything it started
(``cc1``, ``objtool``, make's jobs) -- killing only the ``sh`` or the ``make`` would leave its children
running. A group of its own also keeps a terminal's Ctrl-C from reaching the children before klpforge has
decided what to do; klpforge then ends them itself.

:func:`install_signal_handlers` turns SIGTERM and SIGHUP into :class:`Terminated` (SIGINT stays
``KeyboardInterrupt``), raised in the main thread so every ``finally`` (temporary directories) runs. Exit
codes are the shell's convention, 128 + signal number: 130 SIGINT, 143 SIGTERM, 129 SIGHUP.

>>> run(["true"]).returncode
0
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["Terminated", "install_signal_handlers", "restore_signal_handlers", "run", "start", "release",
           "kill_children", "end_children", "live_children", "GRACE"]

_lock = threading.RLock()  # re-entrant: the signal handler may run while the main thread holds it
_live: dict[int, subprocess.Popen[Any]] = {}
#: Set once a terminating signal arrived: no new child may start after that.
_stopping = threading.Event()
#: Children :func:`kill_children` signalled: their groups are emptied on :func:`release`.
_ended: set[int] = set()
#: Seconds a group gets after SIGTERM (gcc removes its temporary files, make its partial targets)
#: before SIGKILL.
GRACE = 3.0


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; ``exit_code`` is 128 + the signal number (143, 129).

    A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception`` in library code lets it through.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    first = not _stopping.is_set()
    _stopping.set()
    if not first:
        return  # already unwinding: let the cleanup finish
    kill_children()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def install_signal_handlers() -> dict[int, Any]:
    """SIGINT -> ``KeyboardInterrupt``, SIGTERM/SIGHUP -> :class:`Terminated`; each also ends the children.

    Only the first signal raises; later ones (a second Ctrl-C while temporary files are removed) are
    ignored so the cleanup completes. Returns the previous handlers (for :func:`restore_signal_handlers`);
    does nothing outside the main thread, where Python cannot install handlers.
    """
    old: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    _stopping.clear()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, _on_signal)
    return old


def restore_signal_handlers(old: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    for sig, h in old.items():
        signal.signal(sig, h)


def start(cmd: str | Sequence[str | os.PathLike[str]], *, shell: bool = False, cwd: Path | str | None = None,
          stdin: int | IO[Any] | None = subprocess.DEVNULL, stdout: int | IO[Any] | None = None,
          stderr: int | IO[Any] | None = None, text: bool = False) -> subprocess.Popen[Any]:
    """Start ``cmd`` in a new process group and register it; pair with :func:`release`.

    Raises :class:`Terminated` (SIGTERM) if klpforge is already being terminated.
    """
    with _lock:
        if _stopping.is_set():
            raise Terminated(signal.SIGTERM)
        p = subprocess.Popen(cmd, shell=shell, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                             process_group=0)
        _live[p.pid] = p
    return p


def release(p: subprocess.Popen[Any], early: bool = False) -> None:
    """Unregister ``p``. If it is still running, was signalled by :func:`kill_children`, or ``early``
    (klpforge stops waiting for it), end its whole process group first: the group leader (``sh``,
    ``make``) may be gone while its children (``cc1``) still run."""
    with _lock:
        signalled = p.pid in _ended
        _ended.discard(p.pid)
    if early or signalled or p.poll() is None:
        _end_group(p)
    with _lock:
        _live.pop(p.pid, None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed its credentials
        return True
    return True


def _end_group(p: subprocess.Popen[Any]) -> None:
    """SIGTERM the group, SIGKILL what is left after :data:`GRACE` seconds; bounded in time (an orphan
    zombie nobody reaps would keep the group "alive" for ever)."""
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            p.poll()  # reap the leader
            if not _group_alive(p.pid):
                return
            time.sleep(0.02)
    try:
        p.wait(timeout=1)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass


def run(cmd: str | Sequence[str | os.PathLike[str]], *, shell: bool = False, cwd: Path | str | None = None,
        capture_output: bool = False, text: bool = False, stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None, track: list[int] | None = None
        ) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run(check=False)``, but the child's group is killed if klpforge stops waiting
    (an exception, a signal) and :func:`kill_children` can end it from another thread; its pid is appended
    to ``track`` (to end just one batch's children)."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    p = start(cmd, shell=shell, cwd=cwd, stdout=stdout, stderr=stderr, text=text)
    if track is not None:
        track.append(p.pid)
    try:
        out, err = p.communicate()
    except BaseException:
        release(p, early=True)
        raise
    release(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def kill_children(pids: Iterable[int] | None = None) -> None:
    """SIGTERM the process group of every registered child (any thread's), or only of those in ``pids``;
    does not wait (it runs in the signal handler): :func:`release`, in the thread waiting for the child,
    waits for the group to go and SIGKILLs what stays."""
    with _lock:
        procs = list(_live.values()) if pids is None else [_live[p] for p in pids if p in _live]
        _ended.update(p.pid for p in procs)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def end_children() -> None:
    """End every registered child's group and wait for it (:func:`release` with ``early``)."""
    with _lock:
        procs = list(_live.values())
    for p in procs:
        release(p, early=True)


def live_children() -> list[int]:
    """Pids of registered children still running (for tests and diagnostics)."""
    with _lock:
        return [pid for pid, p in _live.items() if p.poll() is None]
