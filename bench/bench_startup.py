"""Benchmark ``klpforge diff`` run as one process per object, the way kpatch-build drives its differ, against
the same pairs diffed in one process; the difference is interpreter and import start-up.

CPU seconds (user + system, so other load on the machine matters less), best of ``--repeat``, over the x86_64
peer pairs (``../shared/peer-objs``). Baselines measured in the same run: the interpreter alone
(``python3 -c pass``) and the in-process diff of the same pairs.

    python3 bench/bench_startup.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

__all__ = ["child_cpu", "main"]

PEER = ROOT.parent / "shared" / "peer-objs"


def child_cpu(cmds: list[list[str]], env: dict[str, str]) -> float:
    """CPU seconds of running ``cmds`` one after the other as child processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for c in cmds:
        subprocess.run(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cases = [c for c in json.loads((PEER / "manifest.json").read_text())["cases"] if c["arch"] == "x86_64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    with tempfile.TemporaryDirectory() as td:
        def diff_cmd(c: dict, i: int) -> list[str]:
            return [py, "-m", "klpforge", "diff", str(PEER / c["orig"]), str(PEER / c["patched"]),
                    "-o", f"{td}/{i}.o", "--symtab", str(PEER / c["orig"])]

        per_process = [diff_cmd(c, i) for i, c in enumerate(cases)]
        envs = [{**env, **c["env"]} for c in cases]
        inproc = [py, "-c", "import json,sys,os; from pathlib import Path; from klpforge.diff import DiffOptions, "
                  "run_diff; from klpforge.errors import KlpError\n"
                  f"cases = json.load(open({str(PEER / 'manifest.json')!r}))['cases']\n"
                  "for i, c in enumerate(x for x in cases if x['arch'] == 'x86_64'):\n"
                  "    try: run_diff(Path(sys.argv[1]) / c['orig'], Path(sys.argv[1]) / c['patched'], "
                  "Path(sys.argv[2]) / f'{i}.o', DiffOptions(symtab=Path(sys.argv[1]) / c['orig'], env=c['env']))\n"
                  "    except KlpError: pass\n", str(PEER), td]

        def best(f: object) -> float:
            return min(f() for _ in range(max(1, args.repeat)))  # type: ignore[operator]

        t_proc = best(lambda: sum(child_cpu([cmd], e) for cmd, e in zip(per_process, envs, strict=True)))
        t_in = best(lambda: child_cpu([inproc], env))
        t_py = best(lambda: child_cpu([[py, "-c", "pass"]] * len(cases), env))
        t_import = best(lambda: child_cpu([[py, "-c", "import klpforge.diff"]], env))
    n = len(cases)
    print(f"{n} x86_64 peer pairs, CPU seconds (best of {args.repeat})")
    print(f"one process per pair:     {t_proc:.2f} s  ({t_proc / n * 1000:.0f} ms/pair)")
    print(f"all pairs in one process: {t_in:.2f} s  ({t_in / n * 1000:.0f} ms/pair incl. one start-up)")
    print(f"interpreter alone:        {t_py / n * 1000:.0f} ms/process; "
          f"`import klpforge.diff`: {t_import * 1000:.0f} ms")
    print(f"ratio per-process / in-process: {t_proc / t_in:.1f}x; start-up share of a per-process pair: "
          f"{(t_proc - t_in) / t_proc * 100:.0f} %")
    if args.json:
        args.json.write_text(json.dumps({"pairs": n, "per_process_s": t_proc, "in_process_s": t_in,
                                         "python_pass_s": t_py / n, "import_diff_s": t_import}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
