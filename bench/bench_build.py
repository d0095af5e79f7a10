#!/usr/bin/env python3
"""Time ``klpforge build`` (split into steps) + ``klpforge verify`` for a one-function patch on the prepared
6.1 tree, against the full kernel builds peers need (kpatch-build and upstream klp-build rebuild the whole
kernel at least twice per patch).

    python bench/bench_build.py [--patch tests/kernel_patches/01-cmdline-text.patch] [--runs 3]
                                [--full-build] [--write-results]

``--full-build`` also times one full ``make -jN`` of the same config into a scratch ``O=`` directory
(~4 min on 2 cores), so both figures come from the same machine and run. ``--write-results`` replaces the
``## build`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klpforge.kbuild.pipeline import STEPS, BuildOptions, build_livepatch  # noqa: E402
from klpforge.kbuild.testkernel import prepared_kernel  # noqa: E402
from klpforge.qemu.verify import VerifySpec, verify_module  # noqa: E402

PEER_FULL_BUILD_S = (155, 216)  # ../shared/docs/kernel-e2e.md: full -j2 build, plain / with section flags


def full_build(build: Path, src: Path, jobs: int) -> float:
    """Time one full build of ``build``'s config in a scratch O= directory."""
    with tempfile.TemporaryDirectory(prefix="klpforge-fullbuild-") as td:
        shutil.copyfile(build / ".config", Path(td) / ".config")
        make = ["make", "-C", str(src), f"O={td}", "ARCH=x86_64"]
        subprocess.run([*make, "olddefconfig"], check=True, capture_output=True)
        t0 = time.monotonic()
        subprocess.run([*make, f"-j{jobs}"], check=True, capture_output=True)
        return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", default=str(ROOT / "tests/kernel_patches/01-cmdline-text.patch"))
    ap.add_argument("--check", default="cat /proc/cmdline")
    ap.add_argument("--expect", default="klpforge=cmdline")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full-build", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    args.patch = str(Path(args.patch).resolve())
    lay = prepared_kernel()
    if lay is None:
        print("no prepared kernel: run `klpforge kernel prepare` first", file=sys.stderr)
        return 1
    per_step: dict[str, list[float]] = {s: [] for s in STEPS}
    totals, verifies = [], []
    with tempfile.TemporaryDirectory(prefix="klpforge-bench-") as td:
        ko = Path(td) / "livepatch-bench.ko"
        for _ in range(args.runs):
            t0 = time.monotonic()
            res = build_livepatch(BuildOptions(src=lay.src, build=lay.build, patch=Path(args.patch), output=ko,
                                               jobs=args.jobs))
            totals.append(time.monotonic() - t0)
            for s in STEPS:
                per_step[s].append(res.timings.get(s, 0.0))
            v = verify_module(VerifySpec(ko=ko, bzimage=lay.bzimage, check=args.check, expect=args.expect))
            if not v.ok:
                print(f"verify failed: {v.reason}", file=sys.stderr)
                return 1
            verifies.append(v.seconds)
    full = full_build(lay.build, lay.src, args.jobs) if args.full_build else None
    med = {s: statistics.median(v) for s, v in per_step.items()}
    build_s, verify_s = statistics.median(totals), statistics.median(verifies)
    lines = [
        "## build",
        "",
        f"Command: `python bench/bench_build.py --patch {Path(args.patch).relative_to(ROOT)} "
        f"--check '{args.check}' --expect '{args.expect}' --runs {args.runs}"
        + (" --full-build" if args.full_build else "") + " --write-results`",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"kernel: prepared 6.1 tinyconfig+fragment (`klpforge kernel prepare`), plain build, `-j{args.jobs}`.",
        "",
        f"One-function patch ({Path(args.patch).name}), median of {args.runs} runs:",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {s} | {med[s]:.2f} |" for s in STEPS],
        f"| **build total** (patch -> .ko, wall) | **{build_s:.2f}** |",
        f"| verify (QEMU boot, load, check, disable, unload) | {verify_s:.2f} |",
        f"| **patch -> verified .ko** | **{build_s + verify_s:.2f}** |",
        "",
        "Peers: kpatch-build and upstream klp-build run at least two full kernel builds per patch, "
        f"{PEER_FULL_BUILD_S[0]}-{PEER_FULL_BUILD_S[1]} s each on this kind of machine "
        f"(kernel-e2e.md), i.e. >= {2 * PEER_FULL_BUILD_S[0]} s.",
    ]
    if full is not None:
        lines.append(f"Measured in this run: one full `make -j{args.jobs}` of the same config: {full:.1f} s "
                     f"(x2 = {2 * full:.0f} s; klpforge is {2 * full / (build_s + verify_s):.0f}x faster "
                     "to a verified module).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        write_section(ROOT / "bench/RESULTS.md", text)
    return 0


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## build`` section of ``path``, leaving other sections alone."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    out, skip = [], False
    for line in old.splitlines(keepends=True):
        if line.startswith("## "):
            skip = line.strip() == "## build"
            if skip:
                continue
        if not skip:
            out.append(line)
    body = "".join(out).rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
