"""Start-up cost of ``klpforge diff`` run as one process per object pair (as kpatch-build drives its
differ), against the same diffs in one process, and the import time of the diff command before and after
the lazy imports (issue 9).

All numbers are CPU seconds (user + system) of child processes or of this process, medians of
``--repeat`` runs, with baselines measured in the same run: a bare ``python3 -c pass`` and
``python3 -c "import numpy"`` (numpy is the floor: the ELF tables are numpy arrays). "Before" is the
package as of ``--before`` (a git revision, unpacked with ``git archive`` into a temporary directory).
Both trees are byte-compiled first (``compileall``), as an installed package is; ``--no-bytecode`` measures
instead with ``PYTHONDONTWRITEBYTECODE=1`` and no cache, where every process compiles klpforge's sources.

    python3 bench/bench_startup.py [--arch x86_64] [--repeat 5] [--before 5d99f26] [--no-bytecode]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer-objs"
IMPORTS = "import klpforge.cli, klpforge.commands.diff, klpforge.diff"


def child_cpu(cmd: list[str], env: dict[str, str]) -> float:
    """CPU seconds (user + sys) of one child process, run in a directory without a klpforge package
    (``-m``/``-c`` put the working directory first on sys.path, ahead of PYTHONPATH)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tempfile.gettempdir())
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def median_cpu(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    return statistics.median(child_cpu(cmd, env) for _ in range(repeat))


def diff_cmd(c: dict, out: Path) -> list[str]:
    args = [sys.executable, "-m", "klpforge", "diff", str(PEER / c["orig"]), str(PEER / c["patched"]),
            "-o", str(out), "--symtab", str(PEER / c["orig"]), "-q"]
    for k, v in c["env"].items():
        args += ["--entsize", f"{k}={v}"]
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", default="5d99f26", help="git revision for the 'before' imports")
    ap.add_argument("--no-bytecode", action="store_true", help="measure without .pyc files")
    args = ap.parse_args()
    cases = [c for c in json.loads((PEER / "manifest.json").read_text())["cases"]
             if c["arch"] == args.arch and c["expect"] == "accept"]
    with tempfile.TemporaryDirectory(prefix="klpforge-startup-") as td:
        tmp = Path(td)
        old = tmp / "before"
        old.mkdir()
        arc = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "klpforge"], capture_output=True,
                             check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=arc, check=True)
        base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        if args.no_bytecode:
            base_env["PYTHONDONTWRITEBYTECODE"] = "1"
            for tree in (ROOT / "klpforge", old / "klpforge"):
                for cache in tree.rglob("__pycache__"):
                    for f in cache.glob("*.pyc"):
                        f.unlink()
        else:
            for tree in (ROOT / "klpforge", old / "klpforge"):
                subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True, env=base_env)
        env_new = dict(base_env, PYTHONPATH=str(ROOT))
        env_old = dict(base_env, PYTHONPATH=str(old))
        t_pass = median_cpu([sys.executable, "-c", "pass"], base_env, args.repeat)
        t_numpy = median_cpu([sys.executable, "-c", "import numpy"], base_env, args.repeat)
        ver_new = median_cpu([sys.executable, "-m", "klpforge", "--version"], env_new, args.repeat)
        ver_old = median_cpu([sys.executable, "-m", "klpforge", "--version"], env_old, args.repeat)
        imp_new = median_cpu([sys.executable, "-c", IMPORTS], env_new, args.repeat)
        imp_old = median_cpu([sys.executable, "-c", IMPORTS + ", klpforge.diff.report, klpforge.commands.build"],
                             env_old, args.repeat)
        # the old CLI imported every command module (build: rich + the build pipeline) and report (rich)
        # before running a diff; the new one imports what `diff -q` uses
        out = tmp / "lp.o"
        proc_new = [median_cpu(diff_cmd(c, out), env_new, max(1, args.repeat // 2)) for c in cases]
        proc_old = [median_cpu(diff_cmd(c, out), env_old, max(1, args.repeat // 2)) for c in cases]
        sys.path.insert(0, str(ROOT))
        import contextlib
        import io

        from klpforge.cli import main as cli_main

        inproc = []
        for c in cases:
            runs = []
            for _ in range(max(1, args.repeat // 2)):
                t0 = time.process_time()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    cli_main(diff_cmd(c, out)[3:])
                runs.append(time.process_time() - t0)
            inproc.append(statistics.median(runs))
    n = len(cases)
    pn, po, ip = sum(proc_new) / n, sum(proc_old) / n, sum(inproc) / n
    print(f"{n} {args.arch} peer pairs, CPU seconds (user+sys), medians of {args.repeat}, "
          f"{'no bytecode cache' if args.no_bytecode else 'byte-compiled'}")
    print(f"baseline python3 -c pass        {t_pass:.3f} s")
    print(f"baseline python3 -c 'import numpy' {t_numpy:.3f} s ({t_numpy / t_pass:.2f}x pass)")
    print(f"klpforge --version (CLI start-up): before {ver_old:.3f} s ({ver_old / t_pass:.2f}x pass), "
          f"after {ver_new:.3f} s ({ver_new / t_pass:.2f}x pass); after/before {ver_new / ver_old:.2f}")
    print(f"import diff command: before {imp_old:.3f} s ({imp_old / t_pass:.2f}x pass), "
          f"after {imp_new:.3f} s ({imp_new / t_pass:.2f}x pass); after/before {imp_new / imp_old:.2f}")
    print(f"per pair, process per pair: before {po:.3f} s, after {pn:.3f} s (after/before {pn / po:.2f})")
    print(f"per pair, in one process:   {ip:.3f} s; process-per-pair/in-process: before {po / ip:.1f}x, "
          f"after {pn / ip:.1f}x; start-up share of a process-per-pair run: {(pn - ip) / pn:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
