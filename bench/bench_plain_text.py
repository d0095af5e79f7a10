"""Benchmark ``klpforge diff`` on one shared ``.text`` (built without ``-ffunction-sections``): a generated C
file of N static functions and one caller, the third function grown by the fix so that every function after
it moves. In one ``.text`` every same-looking function is checked for calls the assembler resolved
(klpforge/diff/sharedsec.py ``resolved_mismatch``); the baseline, measured in the same run, is the same source
built with ``-ffunction-sections -fdata-sections``, where nothing needs decoding. CPU seconds, best of
``--repeat``.

    python3 bench/bench_plain_text.py [--n 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klpforge.diff import DiffOptions, run_diff  # noqa: E402

FLAGS = ["-O2", "-fno-pic", "-mcmodel=kernel", "-mfentry", "-pg", "-mrecord-mcount", "-fno-asynchronous-unwind-tables",
         "-mno-red-zone", "-mno-sse", "-fno-strict-aliasing", "-fno-common", "-nostdinc", "-ffreestanding",
         "-fno-stack-protector"]


def source(n: int, patched: bool) -> str:
    out = ["extern int table[64];"]
    for i in range(n):
        body = f"table[x & 63] * {i * 7} + x"
        if patched and i == 3:
            body = "table[x & 63] * 21 + table[(x + 1) & 63] * 5 + x"
        out.append(f"__attribute__((noinline)) static int f{i}(int x) {{ return {body}; }}")
    out.append("int run(int x) { int s = 0;")
    out += [f" s += f{i}(x + {i});" for i in range(n)]
    out.append(" return s; }")
    return "\n".join(out) + "\n"


def build(tmp: Path, n: int, extra: list[str]) -> tuple[Path, Path]:
    objs = []
    for side in ("orig", "patched"):
        d = tmp / ("sections" if extra else "plain") / side
        d.mkdir(parents=True, exist_ok=True)
        (d / "unit.c").write_text(source(n, side == "patched"))
        subprocess.run(["gcc", *FLAGS, *extra, "-c", "unit.c", "-o", "unit.o"], cwd=d, check=True)
        objs.append(d / "unit.o")
    return objs[0], objs[1]


def timed(a: Path, b: Path, out: Path, repeat: int) -> tuple[float, list[str]]:
    best, got = float("inf"), []
    for _ in range(repeat):
        t0 = time.process_time()
        res = run_diff(a, b, out, DiffOptions(symtab=a, env={}))
        best = min(best, time.process_time() - t0)
        got = sorted(f.old_name for f in res.patched_functions)
    return best, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        plain = timed(*build(tmp, args.n, []), tmp / "p.o", args.repeat)
        sect = timed(*build(tmp, args.n, ["-ffunction-sections", "-fdata-sections"]), tmp / "s.o", args.repeat)
        print(f"N={args.n} functions, f3 grown: one .text {plain[0]:.3f} s (replaces {plain[1]}); "
              f"-ffunction-sections {sect[0]:.3f} s (replaces {sect[1]}); ratio {plain[0] / sect[0]:.2f}")


if __name__ == "__main__":
    main()
