"""Benchmark ``klpforge impact`` memory and time against inline depth, new code against a baseline revision
in the same run (issue 17 item 6: the closure copied the whole chain per function, quadratic memory).

(a) a synthetic dump: ``f0`` inlined into ``f1`` ... inlined into ``fN`` (each also removed, as GCC records),
    queried for ``f0`` with ``--json`` and in text, ``--no-cache``, at depths 1,000, 3,000 and 10,000.
(b) the whole-vmlinux corpus (``../shared/corpora``, 2,664 dumps), ``get_current`` (inlined 4,392 times) and
    ``kernel/sched/core.c:__schedule``, ``--no-cache``.
Each run is a fresh ``python -m klpforge impact`` process; peak memory is its ``ru_maxrss`` (``os.wait4``),
output goes to a pipe that is counted and dropped. The baseline is ``git archive REV klpforge`` unpacked in a
temporary directory (default ``main``). Baseline runs deeper than ``--baseline-max-depth`` (default 3,000: at
10,000 the old code passed 8 GB) are skipped.

    python3 bench/bench_impact_depth.py [--baseline main] [--baseline-max-depth 3000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def chain_dump(d: Path, depth: int) -> Path:
    """``deep.c.000i.ipa-clones``: a ``depth``-deep inlining chain in GCC's format (one unit)."""
    lines = []
    for i in range(1, depth + 1):
        lines.append(f"Callgraph clone;f{i - 1};{i - 1};deep.c;{i};19;f{i};{i};deep.c;{i + 1};19;inlining to")
        lines.append(f"Callgraph removal;f{i - 1};{i - 1};deep.c;{i};19")
    d.mkdir(parents=True, exist_ok=True)
    (d / "deep.c.000i.ipa-clones").write_text("\n".join(lines) + "\n")
    return d


def run(pythonpath: Path, args: list[str]) -> tuple[float, float, int, int]:
    """(wall s, peak RSS MiB, stdout bytes, exit code) of one fresh ``klpforge impact`` process."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "klpforge", "impact", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, cwd=pythonpath)
    n = 0
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        n += len(chunk)
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, ru.ru_maxrss / 1024, n, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision of the old code (default: main)")
    ap.add_argument("--baseline-max-depth", type=int, default=3000)
    ap.add_argument("--depths", default="1000,3000,10000")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="klpforge-bench-depth-") as td:
        tmp = Path(td)
        old = tmp / "old"
        old.mkdir()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", a.baseline, "klpforge"], capture_output=True,
                              check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=arch, check=True)
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.baseline], capture_output=True,
                             text=True, check=True).stdout.strip()
        print(f"baseline {a.baseline} ({rev}) vs working tree {ROOT}")
        print("| case | output | new: s | new: MiB | new: output | old: s | old: MiB | old: output |")
        print("|---|---|---|---|---|---|---|---|")
        cases: list[tuple[str, list[str], int]] = []
        for depth in map(int, a.depths.split(",")):
            d = chain_dump(tmp / f"deep{depth}", depth)
            for out in ("text", "json"):
                args = ["--dumps", str(d), "--no-cache", "f0"] + (["--json"] if out == "json" else [])
                cases.append((f"chain {depth:,} deep", args, depth))
        try:
            from test_ipa_corpus import TARBALL, corpus_dir
            if TARBALL.exists():
                c = corpus_dir()
                for q in ("get_current", "kernel/sched/core.c:__schedule"):
                    for out in ("text", "json"):
                        cases.append((f"vmlinux corpus, {q}",
                                      ["--dumps", str(c), "--no-cache", q] + (["--json"] if out == "json" else []), 0))
        except ImportError:
            pass
        for name, args, depth in cases:
            out = "json" if "--json" in args else "text"
            nw = run(ROOT, args)
            cells = [f"{nw[0]:.2f}", f"{nw[1]:,.0f}",
                     f"{nw[2] / 1e6:,.1f} MB" + ("" if nw[3] == 0 else f" exit {nw[3]}")]
            if depth <= a.baseline_max_depth:
                od = run(old, args)
                cells += [f"{od[0]:.2f}", f"{od[1]:,.0f}",
                          f"{od[2] / 1e6:,.1f} MB" + ("" if od[3] == 0 else f" exit {od[3]}")]
            else:
                cells += ["skipped", "(> 8 GB)", ""]
            print(f"| {name} | {out} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
