"""Benchmark ``klpforge impact`` on the shared vmlinux corpus.

(a) full analysis, no cache: find the 2,664 dumps, read and split every dump and its ``.syms`` table, build the
    index (functions, nodes, edges, symbols), and compute the closure of every node (what a full
    kgraft-ipa-analysis.py run computes). Each run is a fresh process, so nothing is warm but the page cache.
(b) one query with a warm on-disk index, in a fresh process: find the dumps, check the cache fingerprint, load
    the index, answer the query (``kernel/sched/core.c:__schedule``, and ``get_current``, inlined 4,392 times
    in 582 units).
Peak RSS is each process's ``ru_maxrss``. Baseline: kgraft-ipa-analysis.py, 11-12 s on this machine kind.

    python3 bench/bench_impact.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_ipa_corpus import TARBALL, corpus_dir  # noqa: E402

KGRAFT_S = 11.5


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_full() -> dict[str, object]:
    """(a) in this process: returns wall/CPU seconds, stage times, sizes and peak RSS."""
    from klpforge.ipa import closure_all, find_dumps
    from klpforge.ipa.index import StageTimes, build_index

    root = corpus_dir()
    w0, c0 = _clock()
    dumps = find_dumps(root)
    w1, c1 = _clock()
    idx = build_index(dumps)
    w2, c2 = _clock()
    src, _ = closure_all(idx)
    w3, c3 = _clock()
    stages = {"find dumps": (w1 - w0, c1 - c0), **(StageTimes.last.laps if StageTimes.last else {}),
              "closure of every node": (w3 - w2, c3 - c2)}
    return {"wall": w3 - w0, "cpu": c3 - c0, "stages": stages, "dumps": len(dumps), "edges": len(idx.e_src),
            "nodes": len(idx.n_group), "pairs": len(src), "rss_mb": _rss_mb()}


def run_query(query: str) -> dict[str, object]:
    """(b) in this process, the index being cached on disk: wall/CPU seconds, result size, peak RSS."""
    from klpforge.ipa import find_dumps, impact, load_index

    root = corpus_dir()
    w0, c0 = _clock()
    idx = load_index(find_dumps(root))
    w1, c1 = _clock()
    res = impact(idx, [query])
    w2, c2 = _clock()
    return {"wall": w2 - w0, "cpu": c2 - c0, "load": w1 - w0, "query": w2 - w1, "functions": len(res.functions),
            "entries": len(res.entries), "rss_mb": _rss_mb()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> int:
    """Print the figures; exit 0."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per measurement (default 5)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = run_full() if a.child[0] == "full" else run_query(a.child[1])
        print(json.dumps(res))
        return 0
    if not TARBALL.exists():
        print(f"skip: corpus not found at {TARBALL}")
        return 0
    corpus_dir()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    full = [_child("full") for _ in range(a.runs)]
    walls = sorted(float(r["wall"]) for r in full)  # type: ignore[arg-type]
    cpus = sorted(float(r["cpu"]) for r in full)  # type: ignore[arg-type]
    med = statistics.median(walls)
    f0 = full[0]
    print(f"(a) full analysis: {f0['dumps']} dumps, {f0['nodes']} nodes, {f0['edges']} edges, "
          f"{f0['pairs']} closure pairs")
    print(f"    wall s per run: {' '.join(f'{w:.2f}' for w in walls)}; median {med:.2f} "
          f"({KGRAFT_S / med:.1f}x faster than kgraft's {KGRAFT_S} s), best {walls[0]:.2f} "
          f"({KGRAFT_S / walls[0]:.1f}x)")
    print(f"    CPU s per run: {' '.join(f'{c:.2f}' for c in cpus)}; median {statistics.median(cpus):.2f}")
    best = min(full, key=lambda r: float(r["wall"]))  # type: ignore[arg-type]
    stages = best["stages"]
    assert isinstance(stages, dict)
    print("    stages of the best run (wall/CPU s): " + ", ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in
                                                               stages.items()))
    print(f"    peak RSS: {max(float(r['rss_mb']) for r in full):.0f} MB")  # type: ignore[arg-type]
    _child("query", "strlen")  # writes the on-disk index
    for q in ("kernel/sched/core.c:__schedule", "get_current"):
        rs = [_child("query", q) for _ in range(a.runs)]
        w = sorted(float(r["wall"]) for r in rs)  # type: ignore[arg-type]
        r0 = rs[0]
        print(f"(b) warm query {q}: {r0['functions']} functions ({r0['entries']} entries); wall s per run "
              f"(find dumps + fingerprint + load + query): {' '.join(f'{x:.3f}' for x in w)}; median "
              f"{statistics.median(w):.3f}; of which query {statistics.median(float(r['query']) for r in rs):.3f}"  # type: ignore[arg-type]
              f"; peak RSS {max(float(r['rss_mb']) for r in rs):.0f} MB")  # type: ignore[arg-type]
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
