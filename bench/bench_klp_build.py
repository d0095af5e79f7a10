#!/usr/bin/env python3
"""klpforge against upstream klp-build (``scripts/livepatch/klp-build`` of the same 7.3 source) on the same
Clang 19 + ThinLTO + kCFI tree, for the same patches: replaced-function sets side by side, time per patch, and
the objects each compiles.

    python bench/bench_klp_build.py [--patch P ...] [-j 2] [--write-results]

klp-build insists on an in-tree build in its own source directory and writes ``klp-tmp/`` there, so it runs
in a scratch "kernel root" (its scripts and the tree's ``.config``) until it refuses or needs the kernel
itself; it never touches the cached tree. When it refuses (7.3 refuses an LLVM assembler older than 20), the
row says so with its own message and the time it took to say it. ``--write-results`` replaces the
``## klp-build`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klpforge.kbuild.testkernel import prepared_kernel  # noqa: E402

PATCHES = [ROOT / "tests/kernel_patches/01-cmdline-text.patch"]


def run_klpforge(lay, patch: Path, out: Path, jobs: int) -> dict:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "klpforge", "build", "-s", str(lay.src), "-O", str(lay.build),
                        str(patch), "-o", str(out), "--json", str(out.with_suffix(".json")), "-j", str(jobs)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.monotonic() - t0
    if r.returncode != 0:
        return {"ok": False, "why": (r.stderr.strip().splitlines() or ["?"])[-1], "s": took}
    rep = json.loads(out.with_suffix(".json").read_text())
    funcs = sorted(f"{f['old_name']}" for o in rep["objects"] for f in o["functions"])
    rebuilt = [o["object"] for o in rep["objects"]] + rep.get("unchanged_objects", [])
    # compiles: the patched bitcode of each changed file, then two backends (original, patched) per rebuilt object
    changed = sum(1 for o in rep["objects"] if (o["diff_report"].get("lto") or {}).get("why_rebuilt")
                  == "changed by the patch")
    return {"ok": True, "functions": funcs, "s": took, "compiles": changed + 2 * len(set(rebuilt)),
            "timings": rep.get("timings_s", {})}


def run_klp_build(lay, patch: Path, jobs: int) -> dict:  # type: ignore[no-untyped-def]
    """Upstream klp-build in a scratch kernel root holding its scripts and the tree's .config."""
    with tempfile.TemporaryDirectory(prefix="klpforge-klp-build-") as td:
        kroot = Path(td)
        shutil.copytree(lay.src / "scripts/livepatch", kroot / "scripts/livepatch")
        shutil.copyfile(lay.build / ".config", kroot / ".config")
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(kroot / "scripts/livepatch/klp-build"), "-j", str(jobs), str(patch)],
                           cwd=kroot, capture_output=True, text=True, timeout=3600)
        took = time.monotonic() - t0
    err = [ln for ln in (r.stderr + r.stdout).splitlines() if "error" in ln.lower()]
    if r.returncode != 0:
        return {"ok": False, "why": (err or [r.stderr.strip() or "?"])[-1], "s": took}
    return {"ok": True, "why": "built (unexpected in a scratch root)", "s": took}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", action="append", type=Path)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    lay = prepared_kernel("7.3", "clang-thin-cfi")
    if lay is None:
        print("no Clang kernel: run `klpforge kernel prepare --toolchain clang --lto thin --cfi`", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="klpforge-bench-klp-") as td:
        for p in args.patch or PATCHES:
            ours = run_klpforge(lay, p.resolve(), Path(td) / f"{p.stem}.ko", args.jobs)
            theirs = run_klp_build(lay, p.resolve(), args.jobs)
            rows.append((p.name, ours, theirs))
    lines = [
        "## klp-build",
        "",
        f"Command: `python3 bench/bench_klp_build.py -j {args.jobs}` on the cached Clang 19 + ThinLTO (distributed)"
        f" + kCFI 7.3 test kernel; {platform.node() or 'this machine'}, {os.cpu_count()} cores shared with other"
        " sessions. klp-build is the 7.3 source's own `scripts/livepatch/klp-build`, run in a scratch kernel root"
        " (its scripts and the tree's `.config`).",
        "",
        "| patch | klpforge: replaced | klpforge: s | klpforge: compiles | klp-build: replaced | klp-build: s |",
        "|---|---|---|---|---|---|",
    ]
    for name, ours, theirs in rows:
        o_set = ", ".join(ours["functions"]) if ours["ok"] else f"refused/failed: {ours['why']}"
        t_set = "(built)" if theirs["ok"] else f"refused: {theirs['why']}"
        lines.append(f"| {name} | {o_set} | {ours['s']:.1f} | {ours.get('compiles', '-')} | {t_set} | "
                     f"{theirs['s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        res = ROOT / "bench/RESULTS.md"
        old = res.read_text()
        start = old.find("## klp-build\n")
        if start >= 0:
            end = old.find("\n## ", start + 1)
            old = old[:start] + old[end + 1:] if end >= 0 else old[:start]
        res.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
