"""A terminating signal at the worst moment (the scratch directory made, its name not yet bound to the cleanup)
leaves nothing behind: :func:`klpforge.util.fsutil.scratch_dir` and :func:`klpforge.util.proc.signals_held`.

The signal is sent by the process to itself from inside ``tempfile.mkdtemp``, right after the directory exists:
without the hold, Python would raise in the middle of ``mkdtemp`` and the directory would stay. Each case runs in
its own interpreter (klpforge's handlers are process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import os, signal, sys, tempfile
from pathlib import Path
from klpforge.util.proc import Terminated, install_signal_handlers, signals_held
from klpforge.util.fsutil import scratch_dir
install_signal_handlers()
real = tempfile.mkdtemp
def mkdtemp(*a, **k):
    d = real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives before mkdtemp returns
    for _ in range(1000):  # give the interpreter many chances to run the handler here
        pass
    return d
tempfile.mkdtemp = mkdtemp
"""


def _run(body: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("body", [
    """
    try:
        with scratch_dir("klpforge-x-") as d:
            print("body ran", flush=True)
    except Terminated as e:
        print("terminated", e.exit_code)
    """,
    """
    import shutil
    tmp = None
    try:
        with signals_held():
            tmp = Path(tempfile.mkdtemp(prefix="klpforge-y-"))
        print("body ran", flush=True)
    except Terminated as e:
        print("terminated", e.exit_code)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)
    """,
], ids=["scratch_dir", "signals_held"])
def test_signal_while_making_the_directory_leaves_nothing(body: str, tmp_path: Path) -> None:
    r = _run(body, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "terminated 143\n"  # raised before the body: the signal was not lost either
    assert list(tmp_path.iterdir()) == []


def test_without_the_hold_the_directory_stays(tmp_path: Path) -> None:
    """The control: the same signal, no hold: the directory is left behind (what the hold prevents)."""
    r = _run("""
    try:
        d = Path(tempfile.mkdtemp(prefix="klpforge-z-"))
    except Terminated as e:
        print("terminated", e.exit_code)
    """, tmp_path)
    assert r.stdout == "terminated 143\n", r.stderr
    assert [p.name[:11] for p in tmp_path.iterdir()] == ["klpforge-z-"]


def test_a_signal_in_the_body_still_removes_it(tmp_path: Path) -> None:
    r = _run("""
    import tempfile as t
    t.mkdtemp = real
    try:
        with scratch_dir("klpforge-w-") as d:
            (d / "f").write_text("x")
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    except KeyboardInterrupt:
        print("interrupted")
    """, tmp_path)
    assert r.stdout == "interrupted\n", r.stderr
    assert list(tmp_path.iterdir()) == []
