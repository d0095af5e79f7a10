"""Shared fixtures: the read-only peer objects, and a gcc that compiles test sources in the run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout
from klpforge.kbuild.testkernel import prepared_kernel, require_kernel

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PEER = SHARED / "peer-objs"

#: Kernel-like flags: a section per function/object and an ftrace entry in each function.
KCFLAGS = ["-O2", "-ffunction-sections", "-fdata-sections", "-pg", "-mfentry", "-mrecord-mcount", "-fno-PIE",
           "-fno-asynchronous-unwind-tables"]


def peer_cases(arch: str | None = None) -> list[dict]:
    if not (PEER / "manifest.json").is_file():
        return []
    cases = json.loads((PEER / "manifest.json").read_text())["cases"]
    return [c for c in cases if arch is None or c["arch"] == arch]


@pytest.fixture(scope="session")
def gcc() -> str:
    g = shutil.which("gcc")
    if g is None:
        pytest.skip("gcc not installed")
    return g


@pytest.fixture
def cc(gcc: str, tmp_path: Path):
    """Compile C source text to an object: ``cc(src, name, *extra_flags) -> Path``."""

    def build(src: str, name: str = "t", *extra: str) -> Path:
        # original and patched builds of one file: same file name (it scopes the locals), other directory
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "unit.c").write_text(src)
        subprocess.run([gcc, *KCFLAGS, *extra, "-c", "unit.c", "-o", "unit.o"], check=True, cwd=d)
        return d / "unit.o"

    return build


@pytest.fixture(scope="session")
def kernel() -> KernelLayout:
    """The prepared 6.1 test kernel; skips without it, fails instead under KLPFORGE_REQUIRE_KERNEL=1."""
    lay = prepared_kernel()
    if lay is None:
        if require_kernel():
            pytest.fail("KLPFORGE_REQUIRE_KERNEL=1 but no prepared kernel: run `klpforge kernel prepare`")
        pytest.skip("no prepared kernel (run `klpforge kernel prepare`, ~4 min)")
    return lay
