"""The two compiles of one object: as built, and with the flag, outside the user's tree.

A recorded Kbuild command (``cmd_X.o`` of ``.X.o.cmd``, Linux 6.1) is a shell line: the compiler
invocation, then post-steps (objtool, genksyms appending to the ``.cmd`` file). Only the compiler
invocation is run: the post-steps annotate or write into the build tree. Its arguments are rewritten so that
nothing is written into the tree: the dependency file (``-Wp,-MMD,...``) is dropped, ``-o`` points into a
private directory and ``-dumpdir`` puts GCC's dumps next to it. Both builds get ``-ffunction-sections
-fdata-sections -fdump-ipa-clones``; the second also gets the flag under study.

>>> argv = compile_argv("gcc -Wp,-MMD,a/.b.o.d -O2 -c -o a/b.o /s/a/b.c ; ./tools/objtool/objtool a/b.o",
...                     Path("/t/A/a/b.o"), ["-flive-patching=inline-clone"])
>>> " ".join(argv[2:8])
'-ffunction-sections -fdata-sections -fdump-ipa-clones -dumpdir /t/A/a/ -flive-patching=inline-clone'
>>> argv[8:]
['-c', '-o', '/t/A/a/b.o', '/s/a/b.c']
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["BASE_FLAGS", "compile_argv", "CompileJob", "CompileResult", "run_jobs", "lto_refusal",
           "LTO_MESSAGE"]

#: Added to both builds: a section per function (the diff engine's unit) and the ipa-clones dump.
BASE_FLAGS = ("-ffunction-sections", "-fdata-sections", "-fdump-ipa-clones")

#: gcc 12 (``opts.cc``, ``finish_options``): -flive-patching with -flto is "sorry, unimplemented".
LTO_MESSAGE = "live patching is not supported with LTO"

_OPS = frozenset({";", "&&", "||", "|", "&"})


def _first_command(cmd: str) -> list[str]:
    """Arguments of the first command of a shell line (up to the first ``;``/``&&``/``|``)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    out: list[str] = []
    try:
        for tok in lex:
            if tok in _OPS:
                break
            out.append(tok)
    except ValueError as e:
        raise InputError(f"cannot parse the recorded command: {e}") from None
    return out


def lto_refusal(argv: Sequence[str], flag: Sequence[str]) -> str | None:
    """The one-line refusal when ``argv`` uses LTO and ``flag`` is a ``-flive-patching`` mode, else None."""
    lto = any(a.startswith("-flto") and a != "-flto=none" for a in argv) and "-fno-lto" not in argv
    if lto and any(f.startswith("-flive-patching") for f in flag):
        return (f"{' '.join(flag)} with -flto: gcc refuses it ('{LTO_MESSAGE}'); "
                "the flag's cost cannot be measured on an LTO build")
    return None


def compile_argv(command: str, out: Path, flag: Sequence[str]) -> list[str]:
    """The compiler invocation of recorded ``command`` writing only ``out`` and its dumps (in
    ``out.parent``), with :data:`BASE_FLAGS` and ``flag`` added before ``-c``.

    Raises :class:`InputError` for a command with no ``-c``/``-o`` (not a C compile)."""
    argv = _first_command(command)
    res: list[str] = []
    i, seen_c, seen_o = 0, False, False
    while i < len(argv):
        a = argv[i]
        if a.startswith("-Wp,-MMD,") or a.startswith("-Wp,-MD,") or a in ("-MD", "-MMD"):
            i += 1
            continue  # dependency file: Kbuild writes it beside the object, in the tree
        if a in ("-MF", "-MT", "-MQ"):
            i += 2
            continue
        if a in ("-dumpdir", "-dumpbase", "-dumpbase-ext"):
            i += 2
            continue
        if a == "-o" and i + 1 < len(argv):
            seen_o = True
            res += ["-o", str(out)]
            i += 2
            continue
        if a == "-c":
            seen_c = True
            res += [*BASE_FLAGS, "-dumpdir", f"{out.parent}/", *flag, "-c"]
            i += 1
            continue
        res.append(a)
        i += 1
    if not seen_c or not seen_o:
        raise InputError(f"not a C compile command (no -c/-o): {' '.join(argv[:6])} ...")
    return res


@dataclass(frozen=True)
class CompileJob:
    """One compile: run ``argv`` in ``cwd`` (the build directory); ``out`` is the object it writes."""

    obj: str
    variant: str  # "built" or "flag"
    argv: tuple[str, ...]
    cwd: Path
    out: Path


@dataclass
class CompileResult:
    """How a job went: ``ok``, gcc's stderr (first error line in ``error``), wall time in seconds."""

    job: CompileJob
    ok: bool
    error: str
    seconds: float


def _error_line(stderr: str) -> str:
    for line in stderr.splitlines():
        if re.search(r"\b(error|sorry, unimplemented|fatal error)\b", line):
            return line.strip()
    lines = [x for x in stderr.splitlines() if x.strip()]
    return lines[-1].strip() if lines else "compiler failed"


def _run(job: CompileJob) -> CompileResult:
    job.out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        r = run(job.argv, cwd=job.cwd, capture_output=True, text=True,  # own group: ended on a signal
                env={**os.environ, "LC_ALL": "C"})
    except OSError as e:
        return CompileResult(job, False, f"{job.argv[0]}: {e}", time.perf_counter() - t)
    ok = r.returncode == 0 and job.out.is_file()
    return CompileResult(job, ok, "" if ok else _error_line(r.stderr), time.perf_counter() - t)


def run_jobs(jobs: Sequence[CompileJob], parallel: int,
             progress: Callable[[CompileResult], None] | None = None) -> list[CompileResult]:
    """Run ``jobs`` with at most ``parallel`` compilers at once (threads waiting on subprocesses); results
    in job order. A compiler that fails is reported in its result, never raised."""
    out: list[CompileResult] = []
    ex = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        for res in ex.map(_run, jobs):
            out.append(res)
            if progress is not None:
                progress(res)
    except BaseException:
        # a signal: klpforge.util.proc ended the running compilers' groups; start no queued one
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return out
