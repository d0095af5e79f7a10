"""Errors that end a command, each with the exit code the CLI documents.

Exit codes (same as kpatch's create-diff-object, so scripts written for it keep working):

====  =====================================================================
0     success (livepatch written)
1     error: bad input, I/O, a tool that failed
2     the change cannot be live-patched safely (refused)
3     no change found
130   interrupted (Ctrl-C, SIGINT)
143   terminated by SIGTERM (128 + 15; :class:`klpforge.util.proc.Terminated`)
129   terminated by SIGHUP (128 + 1)
====  =====================================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_UNSAFE",
    "EXIT_NO_CHANGE",
    "EXIT_INTERRUPTED",
    "KlpError",
    "InputError",
    "UnsafeChange",
    "NoChange",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNSAFE = 2
EXIT_NO_CHANGE = 3
EXIT_INTERRUPTED = 130


class KlpError(Exception):
    """Base class: a failure with a one-line message meant for a person."""

    exit_code = EXIT_ERROR
    #: a build's kept log (:mod:`klpforge.util.buildlog`) and, with ``--keep-tmp``, its kept temporary directory:
    #: the CLI names both on the error line
    log: object = None
    kept: object = None


class InputError(KlpError):
    """Bad input: a missing, truncated or corrupt file, a wrong architecture, a bad option."""

    exit_code = EXIT_ERROR


class UnsafeChange(KlpError):
    """The change cannot be live-patched safely; ``reasons`` lists every problem found."""

    exit_code = EXIT_UNSAFE

    def __init__(self, reasons: list[str] | str):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        msg = self.reasons[0] if len(self.reasons) == 1 else (
            f"{len(self.reasons)} unsafe changes: " + "; ".join(self.reasons))
        super().__init__(msg)


class NoChange(KlpError):
    """Nothing differs between the two inputs."""

    exit_code = EXIT_NO_CHANGE
