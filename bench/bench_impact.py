"""Benchmark ``klpforge impact`` on the shared vmlinux corpus.

(a) full analysis: parse every dump and symbol table, build the index, close every function (no cache);
(b) one query with a warm on-disk index; peak RSS. Baseline: kgraft-ipa-analysis.py, 11-12 s.

    python bench/bench_impact.py
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_ipa_corpus import TARBALL, corpus_dir  # noqa: E402

from klpforge.ipa import closure_all, find_dumps, impact, load_index  # noqa: E402
from klpforge.ipa.index import build_index  # noqa: E402

KGRAFT_S = 11.5


def main() -> int:
    """Print the figures; exit 0."""
    if not TARBALL.exists():
        print(f"skip: corpus not found at {TARBALL}")
        return 0
    root = corpus_dir()
    t0 = time.perf_counter()
    dumps = find_dumps(root)
    idx = build_index(dumps)
    src, dst = closure_all(idx)
    full = time.perf_counter() - t0
    print(f"(a) full analysis: {len(dumps)} dumps, {len(idx.e_src)} edges, {len(src)} closure pairs: "
          f"{full:.2f} s ({KGRAFT_S / full:.1f}x faster than kgraft's {KGRAFT_S} s)")
    load_index(dumps)  # make sure the cache is written
    t0 = time.perf_counter()
    idx2 = load_index(find_dumps(root))
    res = impact(idx2, ["kernel/sched/core.c:__schedule"])
    warm = time.perf_counter() - t0
    print(f"(b) warm query __schedule: {warm:.3f} s, {len(res.functions)} functions")
    t0 = time.perf_counter()
    res = impact(idx2, ["get_current"])
    print(f"    query get_current on the loaded index: {time.perf_counter() - t0:.3f} s, "
          f"{len(res.functions)} functions")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
