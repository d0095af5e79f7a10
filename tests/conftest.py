"""Shared fixtures: the read-only peer objects, and a gcc that compiles test sources in the run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

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
        c = tmp_path / f"{name}.c"
        c.write_text(src)
        o = tmp_path / f"{name}.o"
        subprocess.run([gcc, *KCFLAGS, *extra, "-c", str(c), "-o", str(o)], check=True, cwd=tmp_path)
        return o

    return build
