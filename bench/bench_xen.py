#!/usr/bin/env python3
"""Time patch -> verified Xen payload (build steps + QEMU verify) against one full hypervisor build of the
same source and config, measured in the same run (livepatch-build-tools builds the hypervisor twice more
per patch: patched and original). Peak RSS of our build (this process) and of the full build (its children).

    python bench/bench_xen.py [--patch ../shared/xen/patches/evtchn-fifo-expand-reset-race.patch]
                              [--runs 3] [--no-verify] [--jobs 2]

Needs the Debian Xen packages and the prepared tree (``klpforge build --distro debian-xen:V`` fetches and
builds them once, cached).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klpforge.xen.debian import DebianXen  # noqa: E402
from klpforge.xen.pipeline import STEPS, XenBuildOptions, build_xen_payload  # noqa: E402
from klpforge.xen.tree import prepare_tree  # noqa: E402
from klpforge.xen.verify import XenVerifySpec, verify_payload  # noqa: E402

VERSION = "4.17.5+72-g01140da4e8-1"


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def full_build(source_tar: Path, config: Path, jobs: int) -> tuple[float, float, int]:
    """Unpack and build the hypervisor from scratch: (wall s, CPU s of the children, peak child RSS KiB)."""
    with tempfile.TemporaryDirectory(prefix="klpforge-xenfull-") as td:
        with tarfile.open(source_tar) as tf:
            tf.extractall(td, filter="tar")
        hv = next(Path(td).glob("*/xen"))
        (hv / ".config").write_bytes(config.read_bytes())
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        for cmd in (["make", "olddefconfig"], ["make", f"-j{jobs}"]):
            subprocess.run(cmd, cwd=hv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, after.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", default=str(ROOT.parent / "shared/xen/patches/evtchn-fifo-expand-reset-race.patch"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    d = DebianXen(VERSION)
    b = d.fetch_binaries()
    src = d.fetch_source()
    tree = prepare_tree(src, b.config, d.dir, jobs=a.jobs)
    # first, so the children's peak RSS is the full build's own (QEMU runs later)
    full_wall, full_cpu, full_rss = full_build(src, b.config, a.jobs)
    steps: dict[str, list[float]] = {s: [] for s in STEPS}
    totals, verifies = [], []
    with tempfile.TemporaryDirectory(prefix="klpforge-benchxen-") as td:
        out = Path(td) / "fix.livepatch"
        cpus = []
        for _ in range(a.runs):
            c0 = _cpu()
            t0 = time.monotonic()
            res = build_xen_payload(XenBuildOptions(src=tree.root, patch=Path(a.patch), xen_syms=b.xen_syms,
                                                    output=out, config=b.config))
            totals.append(time.monotonic() - t0)
            cpus.append(_cpu() - c0)
            for k, v in res.timings.items():
                steps[k].append(v)
        if not a.no_verify:
            vr = verify_payload(XenVerifySpec(payload=out, bins=b, check="cat /sys/hypervisor/version/extra"))
            if not vr.ok:
                print(f"verify failed: {vr.reason}", file=sys.stderr)
                return 1
            verifies.append(vr.seconds)
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    build_med = statistics.median(totals)
    print(f"patch: {Path(a.patch).name}; runs: {a.runs}; -j{a.jobs}")
    print("build steps (median s): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items() if v))
    print(f"build total (median s): {build_med:.2f} wall, {statistics.median(cpus):.2f} CPU (with compilers)")
    if verifies:
        print(f"verify (QEMU boot, upload, apply, check, revert, unload): {verifies[0]:.1f} s")
    print(f"full hypervisor build: {full_wall:.1f} s wall, {full_cpu:.1f} s CPU")
    print(f"CPU ratio full build / our build: {full_cpu / statistics.median(cpus):.1f}x")
    print(f"ratio full build / our build: {full_wall / build_med:.1f}x; "
          f"peer (3 builds) / our build: {3 * full_wall / build_med:.1f}x")
    if verifies:
        total = build_med + verifies[0]
        print(f"patch -> verified payload: {total:.1f} s; 3 full builds / that: {3 * full_wall / total:.1f}x")
    print(f"peak RSS: klpforge process {ours_rss / 1024:.0f} MiB; full build's largest child {full_rss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
