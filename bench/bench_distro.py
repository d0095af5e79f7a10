"""Benchmark the distribution path: from a warm package cache to a verified live patch of the nfsd security fix
(Debian 6.1.0-56-amd64), step by step, against what a full build of the same config costs in the same run.
``--release 6.12.117+deb13-amd64`` runs the same for Debian 13 with the pppoe fix of 6.12.118, including the
creation of the trixie build root (gcc-14) in the temporary cache (timed as *root*).

Steps, each with wall time and the peak RSS of the whole process tree (klpforge + make/gcc/QEMU children,
sampled every 50 ms): *prepare* (cold: unpack the cached packages, configure, ``make prepare
modules_prepare``), *compile*, *match* + *diff*, *link*, *verify* (boot, load nfsd and the patch, transition,
check, disable, unload); then the same build and verify on the warm tree.

Baseline: a full ``make`` of this config is not run (hours on 2 cores); its C objects are counted from a
``make -n`` dry run of the prepared tree, a random sample of them is compiled (their own recorded commands,
one at a time, in a scratch copy of the build directory) and the mean is extrapolated to all objects at -j2.
kpatch-build-style tools build the config twice (original and patched).

    python3 bench/bench_distro.py [--release R] [--sample 24] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klpforge.distro import debian  # noqa: E402
from klpforge.distro.build import DistroBuildOptions, build_distro  # noqa: E402
from klpforge.distro.modules import modules_for  # noqa: E402
from klpforge.qemu.verify import VerifySpec, verify_module  # noqa: E402

__all__ = ["TreeRss", "main"]

#: release -> (patch, module to load, its livepatch function listed in sysfs)
CASES = {
    "6.1.0-56-amd64": (ROOT / "tests/distro_patches/00-nfsd-sequence-cve.patch", "nfsd", "nfsd4_sequence,1"),
    "6.12.117+deb13-amd64": (ROOT / "tests/distro_patches/612-10-pppoe-delete-by-pointer.patch", "pppoe", ""),
}
RELEASE = "6.1.0-56-amd64"
PATCH = CASES[RELEASE][0]


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


class TreeRss:
    """Samples the summed RSS of this process and its descendants; ``peak(step)`` in MB."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.step = "idle"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            kids = _children()
            todo, total = [me], 0
            while todo:
                p = todo.pop()
                total += _rss_kb(p)
                todo.extend(kids.get(p, []))
            self.peaks[self.step] = max(self.peaks.get(self.step, 0), total)
            time.sleep(self.interval)

    def peak(self, step: str) -> float:
        return self.peaks.get(step, 0) / 1024


def count_and_sample(tree: debian.DistroTree, n: int, seed: int, scratch: Path) -> tuple[int, int, float, int]:
    """(C objects of a full build, of which module objects, mean seconds per sampled compile, sample size)."""
    shutil.copytree(tree.build, scratch / "build", symlinks=True)
    cmd = [*debian.make_command(tree, "all", jobs=1)]
    cmd[cmd.index(f"O={tree.build}")] = f"O={scratch / 'build'}"
    from klpforge.distro.roots import in_root

    r = subprocess.run([*cmd, "-n", "-k"], capture_output=True, text=True, check=False)
    lines = [ln for ln in r.stdout.splitlines() if re.search(r"echo '  CC( \[M\])? +\S+\.o'", ln)]
    mods = sum(1 for ln in lines if "CC [M]" in ln)
    rng = random.Random(seed)
    sample = rng.sample(lines, min(n, len(lines)))
    t0 = time.monotonic()
    done = 0
    for ln in sample:
        if subprocess.run(in_root(tree, ["bash", "-c", ln], scratch / "build"), cwd=scratch / "build",
                          capture_output=True, check=False).returncode == 0:
            done += 1
    mean = (time.monotonic() - t0) / max(1, len(sample))
    return len(lines), mods, mean, done


def build_and_verify(tree: debian.DistroTree, rss: TreeRss, out: Path) -> dict[str, float]:
    """One build + verify of the nfsd fix; wall seconds per step (prepare excluded)."""
    times: dict[str, float] = {}
    last = [time.monotonic(), "start"]

    def progress(step: str, _msg: str) -> None:
        now = time.monotonic()
        times[last[1]] = times.get(last[1], 0.0) + now - last[0]
        last[0], last[1] = now, step
        rss.step = step

    patch, module, expect = CASES[tree.release]
    res = build_distro(DistroBuildOptions([patch], tree=tree, output=out, jobs=2), progress)
    progress("verify", "")
    spec = VerifySpec(ko=out, bzimage=tree.vmlinuz or Path(), check=f"ls /sys/kernel/livepatch/{out.stem}/{module}",
                      expect=expect, timeout=600, gen_init_cpio=tree.build / "usr/gen_init_cpio",
                      preload=modules_for(tree, [module]), memory="1G")
    v = verify_module(spec)
    progress("done", "")
    if not v.ok:
        raise SystemExit(f"verify failed: {v.reason}")
    times.pop("start", None)
    times.pop("prepare", None)
    times["objects"] = res.objects_compiled
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=int, default=24, help="objects compiled to extrapolate a full build")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--release", default=RELEASE, choices=sorted(CASES))
    args = ap.parse_args(argv)
    release = args.release
    warm_root = debian.release_root(release)
    debs = warm_root.parent / "debs"
    debian.fetch_packages(release, warm_root, print)  # warm package cache (downloads once if needed)
    with tempfile.TemporaryDirectory(prefix="klpforge-bench-distro-", dir=os.environ.get("TMPDIR")) as td:
        cache = Path(td) / "cache"
        (cache / "distro/debian/debs").mkdir(parents=True)
        for d in debs.glob("*.deb"):
            os.link(d, cache / "distro/debian/debs" / d.name)
        shutil.copytree(warm_root.parents[2] / "apt", cache / "apt", symlinks=True)  # the index, not packages
        with TreeRss() as rss:
            rss.step = "root"
            from klpforge.distro.roots import host_matches, root_for_config

            cc_text = debian.compiler_for_config(warm_root / "image/boot" / f"config-{release}")[1]
            t0 = time.monotonic()
            if host_matches(cc_text) is None:
                os.environ["KLPFORGE_CACHE"] = str(cache)
                root_for_config(cc_text, cache, print)
            root_s = time.monotonic() - t0
            rss.step = "prepare"
            t0 = time.monotonic()
            tree = debian.prepare_tree(release, cache=cache, jobs=2)
            prepare = time.monotonic() - t0
            cold = build_and_verify(tree, rss, Path(td) / "livepatchfix.ko")
            peaks = {k: rss.peak(k) for k in ("root", "prepare", "compile", "diff", "match", "link", "verify")}
            rss.peaks.clear()
            warm = build_and_verify(tree, rss, Path(td) / "livepatchfix.ko")
            rss.step = "sample"
        total, mods, mean, done = count_and_sample(tree, args.sample, args.seed, Path(td))
    full_make = total * mean / 2  # -j2
    ours_compile = warm["compile"]
    steps = ("compile", "diff", "match", "link", "verify")
    print(f"{'step':<10} {'cold tree s':>11} {'warm tree s':>11} {'peak MB':>8}")
    print(f"{'root':<10} {root_s:>11.1f} {'-':>11} {peaks['root']:>8.0f}")
    print(f"{'prepare':<10} {prepare:>11.1f} {'-':>11} {peaks['prepare']:>8.0f}")
    for s in steps:
        print(f"{s:<10} {cold.get(s, 0):>11.1f} {warm.get(s, 0):>11.1f} {peaks[s]:>8.0f}")
    cold_total = root_s + prepare + sum(cold.get(s, 0) for s in steps)
    warm_total = sum(warm.get(s, 0) for s in steps)
    print(f"{'total':<10} {cold_total:>11.1f} {warm_total:>11.1f}")
    print(f"objects compiled: {int(cold['objects'])} (original + patched)")
    print(f"full build of this config: {total} C objects ({mods} in modules); sample of {done}/{args.sample}: "
          f"{mean:.2f} s each -> about {full_make / 60:.0f} min at -j2 (compile only, no link)")
    print(f"ratio full make / our compile step: {full_make / ours_compile:.0f}x; "
          f"two full makes (original + patched, as kpatch-build) / our whole warm run: "
          f"{2 * full_make / warm_total:.0f}x")
    if args.json:
        args.json.write_text(json.dumps({"release": release, "root_s": root_s, "prepare_s": prepare,
                                         "cold": cold, "warm": warm, "peak_mb": peaks,
                                         "full_build_objects": total, "module_objects": mods,
                                         "sample_mean_s": mean, "full_make_s": full_make}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
