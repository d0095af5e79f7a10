"""``klpforge demo --outdir DIR`` (issue 16 item 13): a relative directory works, and a failed demo leaves no
half-written folder (everything is written into a hidden sibling directory, renamed into place at the end)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def demo(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", "demo", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)


@pytest.fixture
def pythonpath() -> dict[str, str]:
    """The environment with this checkout importable from another working directory."""
    root = str(Path(__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def test_relative_outdir(tmp_path: Path, pythonpath: dict[str, str]) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    r = demo("--outdir", "demo-out", cwd=tmp_path, env=pythonpath)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "demo-out"
    assert sorted(p.name for p in out.iterdir()) == ["livepatch-demo.o", "orig", "orig.c", "patched", "patched.c"]
    assert (out / "orig/demo.o").is_file() and (out / "livepatch-demo.o").read_bytes()[:4] == b"\x7fELF"
    assert f"written: {out / 'livepatch-demo.o'}" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]  # no hidden work directory left
    # a second run replaces the earlier demo's output
    r = demo("--outdir", "demo-out", cwd=tmp_path, env=pythonpath)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]


def test_failed_demo_leaves_no_folder(tmp_path: Path, pythonpath: dict[str, str]) -> None:
    """gcc missing from PATH: one line, and neither demo-out nor a work directory is left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    diff = shutil.which("diff")
    assert diff is not None
    (bin_dir / "diff").symlink_to(diff)
    work = tmp_path / "work"
    work.mkdir()
    r = demo("--outdir", "demo-out", cwd=work, env=dict(pythonpath, PATH=str(bin_dir)))
    assert r.returncode == 1
    assert r.stderr == "klpforge demo: gcc not found on PATH: the demo compiles its example with the host gcc\n"
    assert list(work.iterdir()) == []


def test_outdir_with_other_files_refused(tmp_path: Path, pythonpath: dict[str, str]) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me\n")
    r = demo("--outdir", "mine", cwd=tmp_path, env=pythonpath)
    assert r.returncode == 1
    assert r.stderr == ("klpforge demo: --outdir mine: directory holds files the demo did not write (notes.txt): "
                        "name a new or empty directory\n")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me\n"
