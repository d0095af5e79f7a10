"""The diff's cost per function at scale against an earlier revision, in the same run (issue 21).

The synthetic objects of ``bench_diff.py`` (N functions, one changed: a generated C file compiled by gcc)
are diffed by this tree and by ``--before`` (a git revision unpacked with ``git archive``), each in a child
process (``run_diff`` only: the time of reading, correlating, comparing, selecting and emitting, measured
with ``time.process_time`` inside the child), alternating the two trees ``--repeat`` times; the table gives
the medians and their ratio (after / before: below 1 is faster).

    python3 bench/bench_scale.py [--sizes 30000,100000] [--repeat 3] [--before 90f39e4] [--opt=-O2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_diff import CFLAGS, synth  # noqa: E402

CHILD = """
import sys, time
from pathlib import Path
from klpforge.diff import DiffOptions, run_diff
a, b, out = map(Path, sys.argv[1:4])
t = time.process_time()
run_diff(a, b, out, DiffOptions(symtab=a, env={}))
print(time.process_time() - t)
"""


def build(n: int, opt: str, cache: Path) -> tuple[Path, Path]:
    flags = [opt if f == "-O2" else f for f in CFLAGS]
    objs = []
    for name, changed in (("orig", False), ("patched", True)):
        d = cache / f"{opt.lstrip('-')}" / f"n{n}" / name
        o = d / "synth.o"
        if not o.exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "synth.c").write_text(synth(n, changed))
            subprocess.run(["gcc", *flags, "-c", "synth.c", "-o", "synth.o"], cwd=d, check=True)
        objs.append(o)
    return objs[0], objs[1]


def diff_cpu(tree: Path, a: Path, b: Path, out: Path) -> float:
    r = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b), str(out)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=True)
    return float(r.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default="90f39e4", help="git revision to compare with")
    ap.add_argument("--opt", default="-O2", help="optimisation level of the synthetic objects")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "klpforge" / "bench")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        before = t / "before"
        before.mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "klpforge"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=tar, check=True)
        print(f"| N functions | before ({args.before}) | after | after / before | us/function after |")
        print("|---|---|---|---|---|")
        for n in (int(s) for s in args.sizes.split(",")):
            a, b = build(n, args.opt, args.cache)
            tb, ta = [], []
            for _ in range(args.repeat):
                tb.append(diff_cpu(before, a, b, t / "b.o"))
                ta.append(diff_cpu(ROOT, a, b, t / "a.o"))
            mb, ma = statistics.median(tb), statistics.median(ta)
            print(f"| {n:,} | {mb:.2f} s | {ma:.2f} s | {ma / mb:.2f} | {1e6 * ma / n:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
