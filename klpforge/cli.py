"""Command-line entry point: ``klpforge <command> ...``.

Each command lives in ``klpforge/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Errors derived from :class:`klpforge.util.errors.KlpError` become one line on stderr and their exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .util.errors import EXIT_ERROR, EXIT_INTERRUPTED, KlpError, UnsafeChange
from .util.proc import Terminated, end_children, install_signal_handlers, restore_signal_handlers

__all__ = ["main", "entry", "one_line", "error_line", "COMMANDS"]

#: Command modules in the order ``--help`` lists them.
COMMANDS = ("demo", "diff", "diffbatch", "impact", "build", "verify", "kernel", "flagcost", "convert", "extract",
            # the host side (klpforge/host/): issue 20
            "install", "load", "unload", "list", "info", "package", "man", "completion")


class _Parser(argparse.ArgumentParser):
    """argparse with klpforge's error convention: a usage error is bad input (exit 1, one stderr line),
    not argparse's exit 2, which klpforge reserves for a refused unsafe change. Subcommand parsers inherit
    the class (``add_subparsers`` uses ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's (start-up time: one process per object pair
    pays for every import, so the other command modules are not even loaded)."""
    p = _Parser(
        prog="klpforge",
        description="Turn a kernel source patch into a verified Linux live patch.",
        epilog="exit codes: 0 ok, 1 error, 2 unsafe change refused, 3 no change, 130 interrupted (SIGINT), "
               "143 SIGTERM, 129 SIGHUP",
    )
    p.add_argument("--version", action="version", version=f"klpforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    only = only and only.replace("-", "")  # the module of `diff-batch`, `flag-cost`
    for name in (only,) if only in COMMANDS else COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def one_line(msg: str) -> str:
    """``msg`` with control characters escaped (a symbol name read from a damaged string table can hold a
    newline): an error stays one line on stderr."""
    if msg.isprintable():
        return msg
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def error_line(command: str, e: KlpError) -> str:
    """The error as klpforge prints it, one line: a refusal for several reasons names the first and the count
    (every reason is in ``--json`` and the build log), and a build names its kept log and ``--keep-tmp``
    directory.

    >>> error_line("build", UnsafeChange(["a: changed data", "b: __init code"]))
    'klpforge build: 2 unsafe changes refused, the first: a: changed data (every reason: --json)'
    """
    reasons = getattr(e, "reasons", None)
    extra = [f"build log: {e.log}"] if e.log else []
    if isinstance(e, UnsafeChange) and reasons and len(reasons) > 1:
        msg = f"{len(reasons)} unsafe changes refused, the first: {one_line(reasons[0])}"
        if not e.log:
            extra.append("every reason: --json")
        else:
            extra[0] = f"every reason in the build log: {e.log}"
    else:
        msg = one_line(str(e))
    if e.kept:
        extra.append(f"temporary files kept in {e.kept}")
    return f"klpforge {command}: {msg}" + (f" ({'; '.join(extra)})" if extra else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run klpforge with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    old_handlers = install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except Terminated as e:
        print(f"klpforge {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KlpError as e:
        print(error_line(args.command, e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"klpforge {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line, never a traceback, unless debugging
        if os.environ.get("KLPFORGE_DEBUG"):
            raise
        print(f"klpforge {args.command}: internal error: {type(e).__name__}: {one_line(str(e))} "
              "(set KLPFORGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        end_children()  # whatever still runs (a QEMU, a make) ends with klpforge
        restore_signal_handlers(old_handlers)


def entry() -> int:
    """The ``klpforge`` console script: :func:`main` run from byte-code however klpforge is installed
    (:func:`klpforge.util.bytecode.enable`, before the command modules are imported)."""
    from .util.bytecode import enable

    enable()
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
