"""Command-line entry point: ``klpforge <command> ...``.

Each command lives in ``klpforge/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Errors derived from :class:`klpforge.errors.KlpError` become one line on stderr and their exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, KlpError

__all__ = ["main", "COMMANDS"]

#: Command modules in the order ``--help`` lists them.
COMMANDS = ("demo", "diff", "impact", "build", "verify", "kernel")


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klpforge",
        description="Turn a kernel source patch into a verified Linux live patch.",
        epilog="exit codes: 0 ok, 1 error, 2 unsafe change refused, 3 no change, 130 interrupted",
    )
    p.add_argument("--version", action="version", version=f"klpforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            continue  # import only the command that runs: start-up is most of a one-object diff
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run klpforge with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    argl = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argl if not a.startswith("-")), None)
    parser = _parser(first if first in COMMANDS else None)
    args = parser.parse_args(argl)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except KlpError as e:
        print(f"klpforge {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"klpforge {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line, never a traceback, unless debugging
        if os.environ.get("KLPFORGE_DEBUG"):
            raise
        print(f"klpforge {args.command}: internal error: {type(e).__name__}: {e} "
              "(set KLPFORGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
