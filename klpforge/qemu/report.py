"""How ``klpforge verify`` reports a boot, Linux live patch or Xen payload alike: each step, the guest's
outputs, and on failure one plain line naming the saved console log.

>>> report_verify(Console(stderr=True), res, Path("fix.ko"), None, [("check", res.check_output)])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

from rich.markup import escape

from ..util.outputs import atomic_write

__all__ = ["report_verify"]


class _Result(Protocol):
    steps: list[Any]  # each with .name, .ok, .detail
    ok: bool
    seconds: float
    reason: str
    console: str


def report_verify(con: Any, res: _Result, what: Path, console_log: str | None,
                  outputs: list[tuple[str, str]], name_width: int = 11) -> int:
    """Print ``res``'s steps and the non-empty ``(label, text)`` guest outputs on ``con`` (a rich Console);
    returns the exit code: 0 when verified, else 1 after saving the console log (``console_log`` or a
    temporary file) and printing one unwrapped line on stderr."""
    for s in res.steps:
        mark = "[green]ok[/]" if s.ok else "[red]FAIL[/]"
        con.print(f"  {s.name:<{name_width}} {mark} {escape(s.detail)}", highlight=False, soft_wrap=True)
    for label, out in outputs:
        if out:
            con.print(f"  {label} output:", highlight=False)
            for line in out.splitlines():
                con.print(f"    | {line}", highlight=False, markup=False)
    if res.ok:
        con.print(f"[green]verified[/] {what.name} in {res.seconds:.1f} s")
        return 0
    log = console_log
    if not log:
        with tempfile.NamedTemporaryFile(prefix=f"klpforge-verify-{what.stem}-", suffix=".log",
                                         delete=False) as f:
            log = f.name
        Path(log).unlink()
        atomic_write(log, res.console)
    # Plain text: rich would wrap the line at the console width (80 when stderr is not a terminal).
    print(f"klpforge verify: failed: {res.reason} (console log: {log})", file=sys.stderr)
    return 1
