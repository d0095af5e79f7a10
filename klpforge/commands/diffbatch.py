"""``klpforge diff-batch PAIRS [--json REPORT]``: many ``klpforge diff`` runs in one process.

A driver that calls a differ once per changed object (as kpatch-build calls ``create-diff-object``) pays
the interpreter, numpy and klpforge's imports once per object; listing the pairs in a file pays them once.
``PAIRS`` (a file, or ``-`` for stdin) holds one ``klpforge diff`` argument list per line, split as a
shell would (``shlex``): ``ORIG.o PATCHED.o -o OUT.o --symtab vmlinux [--target MOD] [--symvers F]
[--json R] [--entsize VAR=N]``; blank lines and ``#`` comments are skipped. Every line is checked and
run exactly as ``klpforge diff`` with ``-q`` would run it (its own ``--json`` report, its own output, nothing
written for a pair that fails); a failing pair does not stop the others.

stdout: one line per pair, ``LINE: ok|no change|refused|error: ...``. ``--json`` writes a list with one
object per pair (``line``, ``orig``, ``patched``, ``output``, ``result``, ``exit``, ``error``, the
functions replaced). Exit: 1 if a line was an error, else 2 if a pair was refused, else 3 if no pair had a
change, else 0 (a pair without a change is normal in a batch: kpatch-build diffs every rebuilt object).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn, cast

from ..util.errors import EXIT_ERROR, EXIT_NO_CHANGE, EXIT_OK, EXIT_UNSAFE, InputError, KlpError
from ..util.fsutil import open_regular
from ..util.outputs import atomic_write, check_paths

__all__ = ["register", "read_pairs", "batch_exit"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff-batch", help="run many `klpforge diff` pairs in one process (one argument list per line)",
        description="Each line of PAIRS is the arguments of one `klpforge diff` (ORIG PATCHED -o OUT --symtab F "
                    "...; shell quoting; # comments). The pairs run one after the other in this process, each "
                    "as `klpforge diff -q` would, a failure not stopping the others. Exit 1 if a line failed, "
                    "else 2 if a pair was refused, else 3 if no pair had a change, else 0.")
    p.add_argument("pairs", metavar="PAIRS", help="file of `klpforge diff` argument lines, or - for stdin")
    p.add_argument("--json", type=Path, metavar="REPORT",
                   help="write a JSON list here: one object per pair (line, result, exit, error, output)")
    p.set_defaults(func=run)


class _LineParser(argparse.ArgumentParser):
    """The ``diff`` parser for one line: a usage error is that line's error, not the end of the batch."""

    def error(self, message: str) -> NoReturn:
        raise InputError(message)


def _diff_parser() -> argparse.ArgumentParser:
    from . import diff

    p = _LineParser(prog="klpforge diff-batch", add_help=False)
    diff.register(cast("argparse._SubParsersAction[argparse.ArgumentParser]", p.add_subparsers(dest="command")))
    return p


def read_pairs(pairs: str) -> list[tuple[int, list[str]]]:
    """(line number, argument list) for every non-blank, non-comment line of ``pairs`` (a path or ``-``).

    Raises :class:`InputError` for an unreadable file or a line with unbalanced quotes."""
    if pairs == "-":
        text = sys.stdin.read()
    else:
        with open_regular(Path(pairs)) as f:
            text = f.read().decode("utf-8", "replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            argv = shlex.split(line, comments=True)
        except ValueError as e:
            raise InputError(f"{pairs}:{n}: {e}") from None
        if argv:
            out.append((n, argv))
    if not out:
        raise InputError(f"{pairs}: no pairs (one `klpforge diff` argument list per line)")
    return out


def batch_exit(codes: list[int]) -> int:
    """The batch's exit code from the pairs' codes: any error 1, else any refusal 2, else 3 when no pair had
    a change, else 0.

    >>> batch_exit([0, 3]), batch_exit([3, 3]), batch_exit([0, 2, 3]), batch_exit([2, 1])
    (0, 3, 2, 1)
    """
    if any(c not in (EXIT_OK, EXIT_UNSAFE, EXIT_NO_CHANGE) for c in codes):
        return EXIT_ERROR
    if EXIT_UNSAFE in codes:
        return EXIT_UNSAFE
    return EXIT_NO_CHANGE if all(c == EXIT_NO_CHANGE for c in codes) else EXIT_OK


def run(args: argparse.Namespace) -> int:
    import os

    from ..cli import error_line, one_line
    from . import diff

    check_paths({"--json": args.json}, {} if args.pairs == "-" else {"PAIRS": Path(args.pairs)})
    pairs = read_pairs(args.pairs)
    parser = _diff_parser()
    results: list[dict[str, Any]] = []
    where = "stdin" if args.pairs == "-" else args.pairs
    for n, argv in pairs:
        entry: dict[str, Any] = {"line": n, "args": argv}
        try:
            line_args = parser.parse_args(["diff", *argv])
            line_args.quiet = True
            entry.update(orig=str(line_args.orig), patched=str(line_args.patched), output=str(line_args.output))
            res = diff.run_pair(line_args)
            entry.update(result="ok", exit=EXIT_OK, error="",
                         replaced=[f.old_name for f in res.patched_functions])
            msg = f"ok: {line_args.output} replaces {', '.join(entry['replaced']) or '(nothing: new code only)'}"
        except KlpError as e:
            code = e.exit_code
            result = {EXIT_UNSAFE: "refused", EXIT_NO_CHANGE: "no change"}.get(code, "error")
            entry.update(result=result, exit=code, error=str(e), reasons=getattr(e, "reasons", [str(e)]))
            msg = error_line("diff", e).removeprefix("klpforge diff: ")
            msg = msg if msg.startswith(result) else f"{result}: {msg}"
        except Exception as e:  # noqa: BLE001 - one pair's internal error must not lose the others' results
            if os.environ.get("KLPFORGE_DEBUG"):
                raise
            entry.update(result="error", exit=EXIT_ERROR, error=f"internal error: {type(e).__name__}: {e}")
            msg = f"error: internal error: {type(e).__name__}: {one_line(str(e))}"
        results.append(entry)
        print(f"{where}:{n}: {msg}", flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=2, default=str) + "\n")
    return batch_exit([r["exit"] for r in results])
