"""Child processes that end with klpforge, and SIGTERM/SIGHUP as a clean, documented exit.

Every tool klpforge starts (gcc through ``sh -c``, ``make M=``, ``patch``, QEMU) runs in a process group of
its own and is registered here, so :func:`kill_children` can end it together with everything it started
(``cc1``, ``objtool``, make's jobs) -- killing only the ``sh`` or the ``make`` would leave its children
running. A group of its own also keeps a terminal's Ctrl-C from reaching the children before klpforge has
decided what to do; klpforge then ends them itself.

A SIGKILL cannot be caught, so two things outlive it: each child asks the kernel
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux ``kernel/exit.c`` ``forget_original_parent``) to be killed when
the klpforge thread that started it dies, so a QEMU never runs on after ``kill -9`` of klpforge; and a small
watchdog process (started with the first child, in a group of its own) holds the read end of a pipe on
which klpforge announces each child's process group: at end of file -- klpforge gone, however -- it ends
the groups still announced (SIGTERM, SIGKILL after :data:`GRACE`), so the grandchildren of a killed
``make`` or ``sh`` (``cc1``) go too. On a catchable signal, :func:`kill_children` also ends any descendant
that was started some other way (``/proc`` walk), so a tool started without this module cannot outlive
klpforge either.

:func:`install_signal_handlers` turns SIGTERM and SIGHUP into :class:`Terminated` (SIGINT stays
``KeyboardInterrupt``), raised in the main thread so every ``finally`` (temporary directories) runs. Exit
codes are the shell's convention, 128 + signal number: 130 SIGINT, 143 SIGTERM, 129 SIGHUP.

>>> run(["true"]).returncode
0
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["Terminated", "install_signal_handlers", "restore_signal_handlers", "signals_held", "run", "start",
           "release",
           "kill_children", "end_children", "live_children", "descendants", "GRACE"]

_lock = threading.RLock()  # re-entrant: the signal handler may run while the main thread holds it
_live: dict[int, subprocess.Popen[Any]] = {}
#: Set once a terminating signal arrived: no new child may start after that.
_stopping = threading.Event()
#: Children :func:`kill_children` signalled: their groups are emptied on :func:`release`.
_ended: set[int] = set()
#: Seconds a group gets after SIGTERM (gcc removes its temporary files, make its partial targets)
#: before SIGKILL.
GRACE = 3.0

_PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not glibc/musl Linux
    _prctl = None


#: The watchdog: reads ``+PGID``/``-PGID`` lines; at EOF ends the groups left (SIGTERM, then SIGKILL).
_WATCHDOG = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
live = set()
for line in sys.stdin.buffer:
    n = int(line[1:])
    (live.add if line[:1] == b"+" else live.discard)(n)
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except OSError:
        return False
for sig, wait in ((signal.SIGTERM, %r), (signal.SIGKILL, 2.0)):
    for g in live:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    end = time.monotonic() + wait
    while time.monotonic() < end and any(alive(g) for g in live):
        time.sleep(0.05)
"""
_watchdog: subprocess.Popen[bytes] | None = None


def _announce(line: str) -> None:
    """Tell the watchdog (started on first use, under ``_lock``) about a group; never raises."""
    global _watchdog
    try:
        if _watchdog is None or _watchdog.poll() is not None:
            if line.startswith("-"):
                return
            _watchdog = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG % GRACE], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
        assert _watchdog.stdin is not None
        _watchdog.stdin.write(line.encode() + b"\n")
        _watchdog.stdin.flush()
    except (OSError, ValueError):  # pragma: no cover - no interpreter, a closed pipe: PDEATHSIG still holds
        pass


def _die_with_parent(parent: int) -> None:
    """Run in the child between fork and exec: SIGKILL it when the parent thread dies, and exit at once if
    the parent is already gone (it died before the ``prctl``). The terminating signals :func:`start` held
    around the fork are unblocked: a blocked mask survives ``exec``."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINATING)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(255)


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


_TERMINATING = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs; one that arrived meanwhile is handled as the block ends.

    For making a resource (a temporary directory, a log file) and binding it to the name its cleanup uses,
    with no moment in between where a signal would leave it behind. Put the ``with`` inside the ``try`` whose
    cleanup removes the resource: the held signal is raised there. Outside the main thread it does nothing
    (signals are only handled there).

    >>> tmp = None
    >>> try:
    ...     with signals_held():
    ...         tmp = Path(tempfile.mkdtemp())
    ...     work(tmp)
    ... finally:
    ...     if tmp: shutil.rmtree(tmp)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def restore_signal_handlers(old: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    for sig, h in old.items():
        signal.signal(sig, h)


def start(cmd: str | Sequence[str | os.PathLike[str]], *, shell: bool = False, cwd: Path | str | None = None,
          stdin: int | IO[Any] | None = subprocess.DEVNULL, stdout: int | IO[Any] | None = None,
          stderr: int | IO[Any] | None = None, text: bool = False,
          env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    """Start ``cmd`` in a new process group and register it; pair with :func:`release`.

    The child is SIGKILLed by the kernel if the calling thread dies first (``PR_SET_PDEATHSIG``): call
    this from the thread that waits for it. Raises :class:`Terminated` (SIGTERM) if klpforge is already
    being terminated; ``OSError`` if the program cannot be run.
    """
    parent = os.getpid()
    # held around the fork: a handler run inside Python's at-fork callbacks (logging's) has its exception
    # swallowed ("Exception ignored in ..."), and a child not yet registered would escape kill_children
    with signals_held(), _lock:
        if _stopping.is_set():
            raise Terminated(signal.SIGTERM)
        p = subprocess.Popen(cmd, shell=shell, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                             env=env, process_group=0, preexec_fn=lambda: _die_with_parent(parent))
        _live[p.pid] = p
        _announce(f"+{p.pid}")
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
        _announce(f"-{p.pid}")


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
        stderr: int | IO[Any] | None = None, track: list[int] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL, input: bytes | str | None = None,
        env: dict[str, str] | None = None, timeout: float | None = None, check: bool = False
        ) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run`` (same arguments; stdin defaults to ``/dev/null``), but the child's group is
    killed if klpforge stops waiting (an exception, a signal, ``timeout`` seconds: then
    ``subprocess.TimeoutExpired`` as ``subprocess.run`` raises) and :func:`kill_children` can end it from
    another thread; its pid is appended to ``track`` (to end just one batch's children). ``check`` raises
    ``subprocess.CalledProcessError`` on a non-zero exit."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    if input is not None:
        stdin = subprocess.PIPE
    p = start(cmd, shell=shell, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=env)
    if track is not None:
        track.append(p.pid)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except BaseException:
        release(p, early=True)
        raise
    release(p)
    if check and p.returncode:
        raise subprocess.CalledProcessError(p.returncode, p.args, out, err)
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
    if pids is None:
        _signal_descendants(signal.SIGTERM)


def descendants(pid: int | None = None) -> list[int]:
    """Pids of every living descendant of ``pid`` (default: klpforge), from ``/proc/*/stat``'s parent
    field; children first. Costs one small read per process on the machine (milliseconds)."""
    root = os.getpid() if pid is None else pid
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = st[st.rfind(b")") + 2:].split()  # the name may hold spaces and parentheses
        if fields[0] == b"Z":
            continue  # a zombie runs nothing; its parent reaps it
        kids.setdefault(int(fields[1]), []).append(int(d))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_descendants(sig: int) -> None:
    """Send ``sig`` to every descendant (a child started without :func:`start`, and whatever it started)."""
    try:
        pids = descendants()
    except OSError:  # pragma: no cover - no /proc
        return
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_children() -> None:
    """End every registered child's group and wait for it (:func:`release` with ``early``)."""
    with _lock:
        procs = list(_live.values())
        stopping = _stopping.is_set()
    for p in procs:
        release(p, early=True)
    if stopping:  # after a signal: what no registered group held (GRACE was given by release above)
        _signal_descendants(signal.SIGKILL)


def live_children() -> list[int]:
    """Pids of registered children still running (for tests and diagnostics)."""
    with _lock:
        return [pid for pid, p in _live.items() if p.poll() is None]
