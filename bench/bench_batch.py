"""The 40 x86_64 peer pairs as 40 ``klpforge diff`` processes (as kpatch-build drives its differ) and as one
``klpforge diff-batch`` process (issue 21), in three byte-code states of the same source tree.

The tree under test is ``HEAD`` (or ``--rev``) unpacked with ``git archive`` into a temporary directory, so
its byte-code state is known: *compiled* (``compileall``, as pip or ``scripts/setup.sh`` leave it),
*cache prefix* (no ``.pyc`` beside the sources and ``PYTHONDONTWRITEBYTECODE=1``, as on this project's
machines: ``klpforge/util/bytecode.py`` keeps the byte-code under ``<cache>/pycache``; the run that fills it
is not counted) and *from source* (the same without that cache: ``KLPFORGE_NO_PYCACHE=1``, every process
compiles klpforge's modules). Baselines in the same run: ``python3 -c pass`` and ``python3 -c 'import
numpy'`` per process. All figures are CPU seconds (user + system) of the child processes, medians of
``--repeat`` runs.

kpatch's ``create-diff-object`` is not built here: Debian's archive (the only registry klpforge may use)
has no kpatch package, so there is no verified source to build it from in the run; ``--kpatch BINARY`` times
a ``create-diff-object`` you built yourself on the same pairs (its CLI: orig, patched, parent name, parent
symtab as ``readelf -s --wide`` text, Module.symvers, patch name, output).

    python3 bench/bench_batch.py [--repeat 3] [--rev HEAD] [--no-source] [--kpatch PATH/create-diff-object]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer-objs"


def cpu(cmds: list[list[str]], env: dict[str, str], cwd: Path) -> float:
    """CPU seconds (user + sys) of running ``cmds`` one after another as child processes."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for c in cmds:
        subprocess.run(c, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def median(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(repeat))


def pair_args(c: dict, out: Path) -> list[str]:
    args = [str(PEER / c["orig"]), str(PEER / c["patched"]), "-o", str(out / f"{c['case']}.o"),
            "--symtab", str(PEER / c["orig"])]
    for k, v in c["env"].items():
        args += ["--entsize", f"{k}={v}"]
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--kpatch", type=Path, help="a create-diff-object binary to time on the same pairs")
    ap.add_argument("--no-source", action="store_true", help="skip the from-source state (the slowest)")
    args = ap.parse_args()
    cases = [c for c in json.loads((PEER / "manifest.json").read_text())["cases"] if c["arch"] == "x86_64"]
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src, out, cache = t / "src", t / "out", t / "cache"
        src.mkdir()
        out.mkdir()
        cache.mkdir(mode=0o700)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev, "klpforge"], check=True,
                              capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=arch, check=True)
        pairs = t / "pairs"
        pairs.write_text("\n".join(shlex.join(pair_args(c, out)) for c in cases) + "\n")
        procs = [[py, "-m", "klpforge", "diff", *pair_args(c, out), "-q"] for c in cases]
        batch = [[py, "-m", "klpforge", "diff-batch", str(pairs)]]
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "KLPFORGE_NO_PYCACHE")}
        base.update(PYTHONPATH=str(src), KLPFORGE_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1")
        n = len(cases)
        print(f"{n} x86_64 peer pairs, CPU seconds (user+sys), median of {args.repeat}; tree {args.rev}")
        floor = median(lambda: cpu([[py, "-c", "pass"]] * 10, base, t), args.repeat) / 10
        npy = median(lambda: cpu([[py, "-c", "import numpy"]] * 10, base, t), args.repeat) / 10
        print(f"baseline per process: python3 -c pass {floor:.3f} s, import numpy {npy:.3f} s "
              f"({n} processes of numpy alone: {n * npy:.2f} s)")
        states = []
        env_src = dict(base, KLPFORGE_NO_PYCACHE="1")
        if not args.no_source:
            states.append(("from source (no .pyc, no cache)", env_src))
        env_pre = dict(base)
        cpu(procs[:1], env_pre, t)  # fills <cache>/pycache once (not counted)
        states.append(("cache prefix (util/bytecode.py)", env_pre))
        results = {}
        for name, env in states:
            results[name] = (median(lambda env=env: cpu(procs, env, t), args.repeat),
                             median(lambda env=env: cpu(batch, env, t), args.repeat))
        subprocess.run([py, "-m", "compileall", "-q", str(src / "klpforge")], check=True,
                       stdout=subprocess.DEVNULL)
        env_cc = dict(base, KLPFORGE_NO_PYCACHE="1")
        results["compiled (compileall, as installed)"] = (median(lambda: cpu(procs, env_cc, t), args.repeat),
                                                          median(lambda: cpu(batch, env_cc, t), args.repeat))
        print(f"| byte-code | {n} processes | one diff-batch | processes / batch | per pair, processes |")
        print("|---|---|---|---|---|")
        for name, (p, b) in results.items():
            print(f"| {name} | {p:.2f} s | {b:.2f} s | {p / b:.1f}x | {p / n * 1000:.0f} ms |")
        if args.kpatch:
            symvers = t / "Module.symvers"
            symvers.write_text("")
            kcmds = []
            for c in cases:
                st = t / f"{c['case']}.symtab"
                st.write_text(subprocess.run(["readelf", "-s", "--wide", str(PEER / c["orig"])], check=True,
                                             capture_output=True, text=True).stdout)
                kcmds.append([str(args.kpatch), str(PEER / c["orig"]), str(PEER / c["patched"]), "vmlinux",
                              str(st), str(symvers), "bench", str(out / f"k-{c['case']}.o")])
            k = median(lambda: cpu(kcmds, base, t), args.repeat)
            p, b = results["compiled (compileall, as installed)"]
            print(f"kpatch create-diff-object, {n} processes: {k:.2f} s; klpforge processes / kpatch "
                  f"{p / k:.1f}x, batch / kpatch {b / k:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
