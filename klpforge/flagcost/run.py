"""``klpforge flag-cost`` as a function: resolve the tree, compile every object twice, measure.

>>> res = flag_cost(FlagCostOptions(src=Path("linux"), build=Path("build"), paths=["kernel/sched/"]))  # doctest: +SKIP
>>> sum(o.changed for o in res.objects)                                                             # doctest: +SKIP
212
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from ..util.proc import signals_held
from .compile import CompileJob, CompileResult, compile_argv, lto_refusal, run_jobs
from .measure import BuildPair, ObjectCost, measure_object
from .sources import MakeArgs, find_units, plain_make, remove_tree

__all__ = ["FlagCostOptions", "FlagCostResult", "flag_cost", "DEFAULT_FLAG", "resolve_tree"]

DEFAULT_FLAG = "-flive-patching=inline-clone"

#: Options that switch IPA-RA off in the build itself (gcc 12 ``toplev.cc``: profiling or patchable
#: entries disable it; the kernel's ftrace needs one of them).
_NO_IPA_RA = ("-pg", "-fpatchable-function-entry", "-fno-ipa-ra")


@dataclass
class FlagCostOptions:
    """Inputs: source tree, build tree (default: ``src``), PATHs, the flag (a shell word list), jobs,
    ``distro`` (``debian:RELEASE``: use that distribution's prepared tree instead of src/build)."""

    src: Path | None
    paths: list[str]
    build: Path | None = None
    flag: str = DEFAULT_FLAG
    jobs: int = os.cpu_count() or 1
    distro: str | None = None
    keep: Path | None = None  # keep the two builds here (for disassembly spot checks)
    impact: bool = True


@dataclass
class FlagCostResult:
    """Per-object costs, the flag, and wall times in seconds (compiles, analysis)."""

    objects: list[ObjectCost]
    flag: str
    src: Path
    build: Path
    compile_seconds: float
    analysis_seconds: float
    compiles: int
    notes: list[str] = field(default_factory=list)


def resolve_tree(src: Path | None, build: Path | None, distro: str | None) -> tuple[Path, Path, MakeArgs]:
    """(source, build, how to run ``make`` there). ``distro`` ``debian:RELEASE`` asks
    :func:`klpforge.distro.debian.prepare_tree` (imported only then) for its prepared tree, and builds
    missing objects with that backend's ``make`` variables (``make_command``)."""
    if distro:
        kind, _, release = distro.partition(":")
        if kind != "debian" or not release:
            raise InputError(f"--distro {distro}: expected debian:RELEASE (e.g. debian:6.1.0-56-amd64)")
        try:
            from ..distro import debian  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise InputError("--distro needs klpforge.distro.debian, which this installation lacks") from None
        t: Any = debian.prepare_tree(release)
        mk = getattr(debian, "make_command", None)
        tsrc, tbuild = Path(t.src), Path(t.build)
        if mk is None:
            return tsrc, tbuild, plain_make(tsrc)
        return tsrc, tbuild, lambda b, targets, jobs: list(mk(dataclasses.replace(t, build=b), *targets, jobs=jobs))
    if src is None:
        raise InputError("give the kernel source tree with -s (or --distro debian:RELEASE)")
    if not (src / "Makefile").is_file():
        raise InputError(f"{src}: not a kernel source tree (no Makefile)")
    b = build or src
    if not b.is_dir():
        raise InputError(f"{b}: no such build directory")
    return src.resolve(), b.resolve(), plain_make(src.resolve())


def _dump_for(out: Path) -> Path | None:
    found = sorted(out.parent.glob(out.stem + ".*ipa-clones"))
    return found[0] if found else None


def flag_cost(opts: FlagCostOptions, progress: Callable[[CompileResult], None] | None = None) -> FlagCostResult:
    """Compile every object of ``opts.paths`` as built and with ``opts.flag`` in a private directory,
    then measure each (see :mod:`klpforge.flagcost.measure`).

    Raises :class:`InputError`: bad tree or PATH, a compile that fails (its first error line), or LTO with
    ``-flive-patching`` (gcc 12 refuses it)."""
    src, build, make = resolve_tree(opts.src, opts.build, opts.distro)
    try:
        flag = shlex.split(opts.flag)
    except ValueError as e:
        raise InputError(f"--flag {opts.flag!r}: {e}") from None
    if not flag:
        raise InputError("--flag is empty")
    work: Path | None = None
    try:
        with signals_held():  # a signal now is raised inside this try, with work bound
            work = Path(tempfile.mkdtemp(prefix="klpforge-flagcost-"))
        units = find_units(src, build, opts.paths, record=bool(opts.distro), workdir=work, jobs=opts.jobs,
                           make=make)
        out_root = opts.keep or work
        jobs: list[CompileJob] = []
        ipa_ra: dict[str, bool] = {}
        for u in units:
            a = compile_argv(u.command, out_root / "built" / u.obj, [])
            refusal = lto_refusal(a, flag)
            if refusal:
                raise InputError(f"{u.obj}: {refusal}")
            b = compile_argv(u.command, out_root / "flag" / u.obj, flag)
            ipa_ra[u.obj] = not any(x.startswith(_NO_IPA_RA) for x in a) and \
                any(x.startswith(("-flive-patching", "-fno-ipa-ra")) for x in flag)
            jobs += [CompileJob(u.obj, "built", tuple(a), u.cwd, out_root / "built" / u.obj),
                     CompileJob(u.obj, "flag", tuple(b), u.cwd, out_root / "flag" / u.obj)]
        t0 = time.perf_counter()
        results = run_jobs(jobs, opts.jobs, progress)
        t1 = time.perf_counter()
        for r in results:
            if not r.ok:
                if "live patching is not supported with LTO" in r.error:
                    raise InputError(f"{r.job.obj}: {' '.join(flag)} with -flto: gcc refuses it "
                                     "('live patching is not supported with LTO')")
                what = "the build's own command" if r.job.variant == "built" else f"the command with {opts.flag}"
                raise InputError(f"{r.job.obj}: {what} failed: {r.error}")
        objects = []
        for u in units:
            oa, ob = out_root / "built" / u.obj, out_root / "flag" / u.obj
            pair = BuildPair(oa, ob, _dump_for(oa), _dump_for(ob), ipa_ra[u.obj], opts.flag)
            objects.append(measure_object(u.obj, pair, with_impact=opts.impact))
        t2 = time.perf_counter()
        notes = [n for o in objects for n in o.notes]
        if any(x.startswith("-pg") or x.startswith("-fpatchable-function-entry") for j in jobs for x in j.argv):
            notes.append("IPA-RA was already off in the build: gcc disables it with -pg or "
                         "-fpatchable-function-entry (ftrace), so the flag cannot cost anything there")
        return FlagCostResult(objects, opts.flag, src, build, t1 - t0, t2 - t1, len(jobs), notes)
    finally:
        if work is not None:
            remove_tree(work)
