"""The build log a failed build leaves where the user can read it (kpatch users look in ``~/.kpatch/build.log``).

Every ``build`` (kernel tree, ``--distro``, ``--xen``) writes its log (the steps, each tool's output, and at the
end the error or every reason of a refusal) to a temporary file of its own, never inside the build's temporary
directory. A successful build removes it, and so does a failure before any tool ran (bad input: its one line says
everything). Any other failure moves it to ``<cache>/logs/<command>-<patch>-<UTC time>-<random>.log`` (cache:
``KLPFORGE_CACHE``, else ``XDG_CACHE_HOME/klpforge``, else ``~/.cache/klpforge``), copies it to
``<cache>/logs/last-failed.log`` and names it on the error line. The directory keeps the newest :data:`KEEP`
logs.

>>> log = BuildLog.start("build", "fix")                # doctest: +SKIP
>>> log.failed(err)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import KlpError

__all__ = ["BuildLog", "logs_dir", "KEEP"]

#: How many logs ``<cache>/logs`` keeps (the oldest go first).
KEEP = 20


def logs_dir() -> Path:
    """``<cache>/logs`` (created on first use; raises OSError when it cannot be)."""
    from .fsutil import cache_root

    d = cache_root() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class BuildLog:
    """One build's log file; ``path`` is where tools append their output (a temporary file until the build
    fails after a tool ran, when it moves to the cache)."""

    path: Path
    #: a step that runs tools (anything after the input checks) has started: a failure then names the log
    tool_ran: bool = False

    #: Steps that only check inputs (or fetch a cached tree): a failure there is told in full on its one line.
    INPUT_STEPS = frozenset({"check", "prepare"})

    @classmethod
    def start(cls, command: str, stem: str) -> BuildLog:
        """A new log for ``klpforge <command>`` of the patch ``stem`` (header written). Nothing is written to the
        cache unless the build fails."""
        import tempfile

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60] or "patch"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        fd, name = tempfile.mkstemp(prefix=f"klpforge-{command}-{safe}-{stamp}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"klpforge {command} {stem}: started {stamp} UTC\n")
        return cls(Path(name))

    def note(self, text: str) -> None:
        """Append one line (a step, a note)."""
        try:
            with self.path.open("a") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass

    def wrap(self, progress: Callable[[str, str], None] | None) -> Callable[[str, str], None]:
        """A progress callback that also notes each step in the log, then calls ``progress``."""

        def step(name: str, msg: str) -> None:
            self.note(f"[{name}] {msg}")
            if name not in self.INPUT_STEPS:
                self.tool_ran = True
            if progress is not None:
                progress(name, msg)

        return step

    def succeeded(self) -> None:
        """Remove the log: a successful build reports on the terminal and in ``--json``."""
        self.path.unlink(missing_ok=True)

    def failed(self, err: BaseException) -> Path | None:
        """The build failed with ``err``. Before any tool ran (bad input): remove the log, the error line says it
        all; return None. Otherwise append the error (every reason of a refusal, one per line), move the log to
        ``<cache>/logs`` (left in the temporary directory if the cache cannot be written), copy it to
        ``last-failed.log``, prune old logs, put the kept path in the error's message where it named the
        temporary one, attach it as ``err.log`` and return it."""
        if not self.tool_ran or not isinstance(err, KlpError):
            self.succeeded()
            return None
        reasons = getattr(err, "reasons", None) or [str(err) or type(err).__name__]
        kind = {2: "refused", 3: "no change"}.get(err.exit_code, "failed")
        self.note(f"\nklpforge: {kind}:")
        for r in reasons:
            self.note(f"  - {r}")
        kept = self.path
        try:
            d = logs_dir()
            kept = d / self.path.name.removeprefix("klpforge-")
            shutil.move(self.path, kept)
            shutil.copyfile(kept, d / "last-failed.log")
            logs = sorted((p for p in d.glob("*.log") if p.name != "last-failed.log"),
                          key=lambda p: p.stat().st_mtime)
            for old in logs[:-KEEP]:
                old.unlink(missing_ok=True)
        except OSError:
            kept = self.path if self.path.exists() else kept
        old_name = str(self.path)
        err.args = tuple(a.replace(old_name, str(kept)) if isinstance(a, str) else a for a in err.args)
        if isinstance(getattr(err, "reasons", None), list):
            err.reasons = [r.replace(old_name, str(kept)) for r in err.reasons]  # type: ignore[attr-defined]
        err.log = kept
        return kept
