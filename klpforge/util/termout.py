"""Human output that works on a terminal and on a pipe or a CI log alike.

On a terminal: rich's live spinner/progress bar and tables sized to the window. Anywhere else (a pipe, a file,
a CI log) rich would print nothing for a live display and cut tables to 80 columns, so instead:

* every step or status is a plain line as it starts (``klpforge build: [2/6] compiling 3 object(s)``), and a
  step that runs for long says so every :data:`HEARTBEAT_S` seconds (``... still compiling (60 s)``). These
  lines go to standard output (``build`` and ``verify`` print nothing else there), so that standard error keeps
  the promise of one line per error; a command whose standard output is data (``kernel prepare``) passes
  ``out=sys.stderr``;
* consoles are :data:`PIPE_WIDTH` columns wide: tables take the width of their content, never cut to 80.

>>> con = console(stderr=True)                                   # doctest: +SKIP
>>> with steps(con, "build", 6) as step:                          # doctest: +SKIP
...     step(0, "checking tree and patch")
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["console", "steps", "status", "note", "rule", "PIPE_WIDTH", "HEARTBEAT_S"]

#: Console width when the output is not a terminal: wide enough that no table is cut.
PIPE_WIDTH = 400
#: Seconds between "still ..." lines of a long step on a non-terminal.
HEARTBEAT_S = float(os.environ.get("KLPFORGE_HEARTBEAT_S", "30"))


def console(stderr: bool = False, **kw: Any) -> Console:
    """A rich Console for stdout (or stderr): the terminal's width on a terminal, :data:`PIPE_WIDTH` columns
    otherwise, whatever ``COLUMNS`` says (shells and test runners export ``COLUMNS=80`` to their children, which
    would cut every table of a log)."""
    con = Console(stderr=stderr, **kw)
    if not con.is_terminal and "width" not in kw:
        # soft_wrap: a long line (a path) is printed whole, never broken at the width
        con = Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=kw.pop("soft_wrap", True), **kw)
    return con


def _plain(out: TextIO | None, text: str) -> None:
    """One plain line on ``out`` (default: standard output), flushed now."""
    try:
        print(text, file=out or sys.stdout, flush=True)
    except (BrokenPipeError, ValueError):
        pass  # a reader that went away must not end the build


class _Heartbeat:
    """A thread printing ``  ... still <what> (<n> s)`` every :data:`HEARTBEAT_S` s while a step lasts."""

    def __init__(self, out: TextIO | None, prefix: str) -> None:
        self.out, self.prefix = out, prefix
        self.what = ""
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def set(self, what: str) -> None:
        with self._lock:
            self.what, self.since = what, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                what, since = self.what, self.since
            if what:
                _plain(self.out, f"{self.prefix}... still {what} ({time.monotonic() - since:.0f} s)")

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def steps(con: Console, command: str, total: int, out: TextIO | None = None) -> Iterator[Callable[[int, str], None]]:
    """A progress display over ``total`` steps; yields ``step(index, description)`` (index from 0).

    On a terminal (``con``'s): rich's transient bar. Otherwise one line ``klpforge <command>: [i/total]
    description`` per call on ``out`` (default: standard output), with heartbeats while a step lasts."""
    if con.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=con, transient=True) as prog:
            task = prog.add_task("starting", total=total)

            def show(i: int, desc: str) -> None:
                prog.update(task, description=f"[{min(i, total - 1) + 1}/{total}] {desc}", completed=i)

            yield show
            prog.update(task, completed=total)
        return
    prefix = f"klpforge {command}: "
    with _Heartbeat(out, prefix) as beat:
        last: list[str] = []

        def show(i: int, desc: str) -> None:
            line = f"[{min(i, total - 1) + 1}/{total}] {desc}"
            if last and last[0] == line:
                return
            last[:] = [line]
            _plain(out, prefix + line)
            beat.set(desc)

        yield show


@contextmanager
def status(con: Console, command: str, what: str, out: TextIO | None = None,
           announce: bool = True) -> Iterator[None]:
    """``con.status(what)`` on a terminal; otherwise a plain ``klpforge <command>: <what>`` line on ``out``
    (default: standard output; ``announce=False``: no first line, only the heartbeats of a long wait, for a
    command whose stdout is its report and whose quick failures must stay one line on stderr) and heartbeats
    while it lasts."""
    if con.is_terminal:
        with con.status(what):
            yield
        return
    prefix = f"klpforge {command}: "
    if announce:
        _plain(out, prefix + what)
    with _Heartbeat(out, prefix) as beat:
        beat.set(what)
        yield


def note(command: str, text: str, out: TextIO | None = None) -> None:
    """An informational line, ``klpforge <command>: <text>``, on ``out`` (default: standard output, with the
    progress lines: standard error is for the one error line)."""
    _plain(out, f"klpforge {command}: {text}")


def rule(con: Console, title: str) -> None:
    """A titled horizontal rule: the terminal's width on a terminal, a short plain one otherwise."""
    if con.is_terminal:
        con.rule(title)
    else:
        con.print(f"── {title} " + "─" * max(4, 76 - len(title)), markup=False, highlight=False)
