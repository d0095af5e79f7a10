"""Benchmark ``klpforge diff`` per architecture: every peer pair of each architecture, all in one process.

Prints, per architecture, the number of pairs, their total and per-pair time (best of ``--repeat``), the
object bytes read, and the ratio of the per-pair time to x86_64's measured in the same run (the pairs
differ in size, so the per-megabyte ratio is printed too).

    python3 bench/bench_arch.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klpforge.diff import DiffOptions, run_diff  # noqa: E402
from klpforge.util.errors import KlpError  # noqa: E402

__all__ = ["ARCHES", "time_arch", "main"]

PEER = ROOT.parent / "shared" / "peer-objs"
ARCHES = ("x86_64", "ppc64le", "s390x", "aarch64", "loongarch64")


def time_arch(cases: list[dict], out: Path, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds (by ``clock``) to diff every pair in ``cases`` (refusals included: they are part of the work).

    >>> time_arch([], Path("/tmp"))  # doctest: +ELLIPSIS
    0.0...
    """
    t = clock()
    for c in cases:
        try:
            run_diff(PEER / c["orig"], PEER / c["patched"], out / f"{c['arch']}-{c['case']}.o",
                     DiffOptions(symtab=PEER / c["orig"], env=c["env"]))
        except KlpError:
            pass
    return clock() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per architecture; the best is kept")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    cases = json.loads((PEER / "manifest.json").read_text())["cases"]
    by_arch = {a: [c for c in cases if c["arch"] == a] for a in ARCHES}
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        time_arch(cases[:3], out)  # warm imports (capstone, numpy) outside the measurements
        for a in ARCHES:
            best = min(time_arch(by_arch[a], out) for _ in range(max(args.repeat, 1)))
            size = sum((PEER / c[k]).stat().st_size for c in by_arch[a] for k in ("orig", "patched"))
            rows[a] = {"pairs": len(by_arch[a]), "seconds": best, "mbytes": size / 1e6}
    base = rows["x86_64"]
    base_pp, base_mb = base["seconds"] / base["pairs"], base["seconds"] / base["mbytes"]
    print(f"{'arch':<12} {'pairs':>5} {'total s':>8} {'ms/pair':>8} {'MB read':>8} {'x86 ratio/pair':>15} "
          f"{'x86 ratio/MB':>13}")
    for a, r in rows.items():
        pp, mb = r["seconds"] / r["pairs"], r["seconds"] / r["mbytes"]
        r["ratio_per_pair"], r["ratio_per_mb"] = pp / base_pp, mb / base_mb
        print(f"{a:<12} {r['pairs']:>5} {r['seconds']:>8.3f} {pp * 1e3:>8.1f} {r['mbytes']:>8.1f} "
              f"{r['ratio_per_pair']:>15.2f} {r['ratio_per_mb']:>13.2f}")
    total = sum(r["seconds"] for r in rows.values())
    print(f"all {sum(r['pairs'] for r in rows.values())} pairs: {total:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
