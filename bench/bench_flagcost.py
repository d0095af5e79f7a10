"""Benchmark ``klpforge flag-cost``: the whole command on a directory (two compiles per object plus the
analysis) against the two compiles alone, both measured in this run on the same objects.

The baseline runs exactly the compiler invocations flag-cost runs (same arguments, same ``-j``), in a
private directory, and nothing else. The ratio says what the analysis (diff engine, reasons, impact sets)
adds on top of compiling.

    python3 bench/bench_flagcost.py [-s SRC -O BUILD] [--path kernel/sched/] [-j 2] [--runs N]

Without ``-s``, the prepared test kernel (``klpforge kernel prepare``) is used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compiles_only(src: Path, build: Path, path: str, jobs: int, flag: str) -> tuple[float, int]:
    """Wall seconds of the two compiles of every object of ``path``, nothing else; and the job count."""
    import shlex

    from klpforge.flagcost.compile import CompileJob, compile_argv, run_jobs
    from klpforge.flagcost.sources import find_units, remove_tree

    work = Path(tempfile.mkdtemp(prefix="bench-flagcost-"))
    try:
        jobs_ = []
        for u in find_units(src, build, [path]):
            for tag, fl in (("built", []), ("flag", shlex.split(flag))):
                out = work / tag / u.obj
                jobs_.append(CompileJob(u.obj, tag, tuple(compile_argv(u.command, out, fl)), u.cwd, out))
        t = time.perf_counter()
        res = run_jobs(jobs_, jobs)
        dt = time.perf_counter() - t
        bad = [r for r in res if not r.ok]
        if bad:
            raise SystemExit(f"{bad[0].job.obj}: {bad[0].error}")
        return dt, len(jobs_)
    finally:
        remove_tree(work)


def full(src: Path, build: Path, path: str, jobs: int, flag: str) -> tuple[float, float, float, int]:
    """Wall seconds of the whole command (as a function call), and its own compile/analysis split."""
    from klpforge.flagcost.run import FlagCostOptions, flag_cost

    t = time.perf_counter()
    res = flag_cost(FlagCostOptions(src=src, build=build, paths=[path], flag=flag, jobs=jobs))
    dt = time.perf_counter() - t
    return dt, res.compile_seconds, res.analysis_seconds, sum(o.total for o in res.objects)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", "--src", type=Path)
    ap.add_argument("-O", "--build", type=Path)
    ap.add_argument("--path", default="kernel/sched/")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--flag", default="-flive-patching=inline-clone")
    a = ap.parse_args()
    if a.src is None:
        from klpforge.kbuild.prepare import KernelLayout

        lay = KernelLayout.default("6.1")
        a.src, a.build = lay.src, lay.build
    base, whole, comp, ana = [], [], [], []
    nfunc = njobs = 0
    for _ in range(a.runs):  # alternate, so a change in machine load hits both
        b, njobs = compiles_only(a.src, a.build or a.src, a.path, a.jobs, a.flag)
        base.append(b)
        w, c, an, nfunc = full(a.src, a.build or a.src, a.path, a.jobs, a.flag)
        whole.append(w)
        comp.append(c)
        ana.append(an)
    mb, mw = statistics.median(base), statistics.median(whole)
    print(f"{a.path} of {a.build or a.src}: {njobs} compiles, {nfunc} functions, -j{a.jobs}, {a.runs} run(s), median")
    print(f"| two compiles alone (baseline) | {mb:.1f} s |")
    print(f"| flag-cost, whole command | {mw:.1f} s (x{mw / mb:.2f} the baseline) |")
    print(f"| of which its compiles | {statistics.median(comp):.1f} s |")
    print(f"| of which the analysis | {statistics.median(ana):.1f} s ({100 * statistics.median(ana) / mb:.0f}% "
          "of the baseline) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
