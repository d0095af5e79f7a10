"""``klpforge completion bash``: the shell completion script, generated from the argument parser.

>>> # klpforge completion bash > /usr/share/bash-completion/completions/klpforge
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run_completion"]


def run_completion(args: argparse.Namespace) -> int:
    """Print the script."""
    from ..cli import _parser
    from ..host.manpage import bash_completion

    sys.stdout.write(bash_completion(_parser()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``completion``."""
    p = subparsers.add_parser("completion", help="print the shell completion script (bash)",
                              description="Completes commands, their options, option choices and files.",
                              epilog="exit codes: 0 ok, 1 error")
    p.add_argument("shell", choices=["bash"], help="the shell (bash)")
    p.set_defaults(func=run_completion)
