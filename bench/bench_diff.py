"""Benchmark ``klpforge diff``: (a) every x86_64 peer pair in one process, (b) synthetic objects with
N = 1k, 10k, 100k functions (a generated C file compiled by gcc), one function changed.

Ratios are against baselines measured in the same run: (a) reading the same objects' symbols and
relocations with pyelftools, (b) the N=1k time scaled linearly. Times are CPU seconds of this process
(``time.process_time``), best of ``--repeat``, so other load on the machine disturbs them less.

    python3 bench/bench_diff.py [--sizes 1000,10000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_arch import time_arch  # noqa: E402  (same peer-pair loop, CPU clock here)

from klpforge.diff import DiffOptions, run_diff  # noqa: E402

PEER = ROOT.parent / "shared" / "peer-objs"
CFLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-pg", "-mfentry", "-mrecord-mcount", "-fno-PIE"]


def peer_pairs(arch: str) -> list[dict]:
    cases = json.loads((PEER / "manifest.json").read_text())["cases"]
    return [c for c in cases if c["arch"] == arch]


def pyelftools_read(cases: list[dict]) -> float:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    t = time.process_time()
    for c in cases:
        for key in ("orig", "patched"):
            with open(PEER / c[key], "rb") as f:
                e = ELFFile(f)
                for sec in e.iter_sections():
                    if sec.name == ".symtab":
                        for _ in sec.iter_symbols():
                            pass
                    elif isinstance(sec, RelocationSection):
                        for _ in sec.iter_relocations():
                            pass
    return time.process_time() - t


def synth(n: int, changed: bool) -> str:
    out = ["extern int printk(const char *, ...);", "static int table[64];"]
    for i in range(n):
        k = i * 7 + (1 if changed and i == n // 2 else 0)
        out.append(f"static int s{i}(int x) {{ return x * {k} + table[{i % 64}]; }}")
        out.append(f"int f{i}(int x) {{ if (x < 0) printk(\"f{i} %d\\n\", x); return s{i}(x) + {i}; }}")
    return "\n".join(out) + "\n"


def build_synth(n: int, cache: Path) -> tuple[Path, Path]:
    objs = []
    for name, changed in (("orig", False), ("patched", True)):
        d = cache / f"n{n}" / name
        o = d / "synth.o"
        if not o.exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "synth.c").write_text(synth(n, changed))
            subprocess.run(["gcc", *CFLAGS, "-c", "synth.c", "-o", "synth.o"], cwd=d, check=True)
        objs.append(o)
    return objs[0], objs[1]


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if (PEER / "manifest.json").is_file():
            cases = peer_pairs("x86_64")
            ours = best(lambda: time_arch(cases, out, time.process_time), args.repeat)
            base = best(lambda: pyelftools_read(cases), args.repeat)
            print(f"x86_64 peer pairs: {len(cases)} diffs in {ours:.3f} s (target < 1 s); pyelftools only reading "
                  f"the same files: {base:.3f} s; ratio ours/pyelftools-read = {ours / base:.2f}")
        cache = Path.home() / ".cache" / "klpforge" / "bench"
        sizes = [int(s) for s in args.sizes.split(",")]
        first = None
        for n in sizes:
            a, b = build_synth(n, cache)
            t = best(lambda a=a, b=b: (lambda t0: (run_diff(a, b, out / "s.o", DiffOptions(symtab=a, env={})),
                                                   time.process_time() - t0)[1])(time.process_time()),
                     args.repeat if n <= 10000 else 1)
            first = first or (n, t)
            lin = first[1] * n / first[0]
            print(f"synthetic N={n:>6} functions: {t:.3f} s, {1e6 * t / n:.1f} us/function, "
                  f"ratio to linear extrapolation from N={first[0]}: {t / lin:.2f}")
        vmo = Path.home() / ".cache" / "klpforge" / "kernel-6.1" / "build" / "vmlinux.o"
        if vmo.is_file():  # a real kernel object: the prepared 6.1 tinyconfig vmlinux.o against itself
            from klpforge.util.errors import NoChange

            def self_diff() -> float:
                t0 = time.process_time()
                try:
                    run_diff(vmo, vmo, out / "vm.o", DiffOptions(symtab=vmo.with_name("vmlinux"), env={}))
                except NoChange:
                    pass
                return time.process_time() - t0

            print(f"vmlinux.o of the prepared 6.1 kernel against itself: {best(self_diff, args.repeat):.3f} s "
                  f"(no change found, as it must)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
