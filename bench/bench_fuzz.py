"""Long fuzz run of ``klpforge diff`` on damaged peer objects (the suite's ``tests/test_fuzz_input.py``
runs 400 of these; this runs as many as asked, default 10,000).

Each run corrupts one object of a random peer pair (all five architectures; the original, the patched, or
the original standing in for the target's symbol table)
with :func:`tests.elf_mutate.mutate` and checks every promise: exit code in {0,1,2,3}, one stderr line on
failure naming the damaged file, no output or temporary file left, and every exit-0 output read by
``readelf -aW`` without a warning and accepted by ``klpforge.elf.validate``. Prints the outcome counts,
each distinct problem (with the mutation that caused it) and the time per run against a baseline measured
in the same run (the undamaged pairs through the same entry point).

    python3 bench/bench_fuzz.py [--runs 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.elf_mutate import Layout, layout, mutate, run_mutated  # noqa: E402

PEER = ROOT.parent / "shared" / "peer-objs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--seed", default="1")
    args = ap.parse_args()
    cases = [c for c in json.loads((PEER / "manifest.json").read_text())["cases"] if c["expect"] == "accept"]
    rng = random.Random(args.seed)
    layouts: dict[Path, Layout] = {}
    codes: Counter[int] = Counter()
    per_arch: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="klpforge-fuzz-") as td:
        tmp = Path(td)
        t0 = time.process_time()
        for c in cases:  # baseline: every undamaged pair once, through the same checks
            r = run_mutated(PEER / c["orig"], PEER / c["patched"], "patched", (PEER / c["patched"]).read_bytes(),
                            "none", tmp, c["env"])
            if r.problem:
                print(f"baseline {c['arch']}/{c['case']}: {r.problem}")
        base = (time.process_time() - t0) / len(cases)
        t0 = time.process_time()
        for k in range(args.runs):
            c = rng.choice(cases)
            side = rng.choice(["orig", "patched", "symtab"])
            orig, patched = PEER / c["orig"], PEER / c["patched"]
            src = patched if side == "patched" else orig
            lay = layouts.get(src) or layouts.setdefault(src, layout(src.read_bytes()))
            data, desc = mutate(lay, rng)
            r = run_mutated(orig, patched, side, data, desc, tmp, c["env"])
            codes[r.rc] += 1
            per_arch[c["arch"]] += 1
            if r.problem:
                key = f"{r.problem[:80]} | {(r.stderr.splitlines() or [''])[-1][:100]}"
                problems[key] += 1
                if problems[key] == 1:
                    print(f"run {k}: {c['arch']}/{c['case']} {side} {desc}: exit {r.rc}: {r.problem}")
        per_run = (time.process_time() - t0) / max(args.runs, 1)
    print(f"runs {args.runs} (seed {args.seed}), by architecture {dict(sorted(per_arch.items()))}")
    print(f"exit codes {dict(sorted(codes.items()))}; problems {sum(problems.values())} "
          f"({len(problems)} distinct)")
    print(f"CPU per run {per_run * 1000:.1f} ms; undamaged pair {base * 1000:.1f} ms; ratio {per_run / base:.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
