"""``klpforge diff-batch``: many pairs in one process give what one ``klpforge diff`` process per pair gives.

Real inputs: kpatch's x86_64 unit-test object pairs (``../shared/peer-objs``), one that makes a live patch,
one refused (changed ``__init`` code), one without a change (only ``__LINE__`` moved), plus lines that are
wrong (a missing object, an unknown option, unbalanced quotes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PEER

pytestmark = pytest.mark.skipif(not (PEER / "manifest.json").is_file(), reason="../shared/peer-objs not present")

ROOT = Path(__file__).resolve().parent.parent
X86 = PEER / "x86_64"


def _klpforge(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True, env=env,
                          input=stdin, cwd=cwd, check=False, timeout=300)


def _pair(case: str, patched: str = "PATCHED") -> list[str]:
    orig = X86 / f"{case}.ORIG.o"
    return [str(orig), str(X86 / f"{case}.{patched}.o"), "--symtab", str(orig)]


def test_batch_matches_one_process_per_pair(tmp_path: Path) -> None:
    ok, refused, nochange = ("special-static", "meminfo-init", "warn-detect")
    lines = [
        "# kpatch's unit-test pairs, one `klpforge diff` argument list per line",
        " ".join(_pair(ok) + ["-o", "ok.o", "--json", "ok.json"]),
        "",
        " ".join(_pair(refused, "PATCHED.FAIL") + ["-o", "refused.o", "--json", "refused.json"]),
        " ".join(_pair(nochange, "PATCHED.FAIL") + ["-o", "same.o"]),
        " ".join(["missing.o"] + _pair(ok)[1:] + ["-o", "missing-out.o"]),
        " ".join(_pair(ok) + ["-o", "bad-opt.o", "--no-such-option"]),
    ]
    (tmp_path / "pairs").write_text("\n".join(lines) + "\n")
    r = _klpforge("diff-batch", "pairs", "--json", "batch.json", cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # a line was an error: the batch is an error, the other pairs still ran
    out = r.stdout.splitlines()
    assert out[0] == "pairs:2: ok: ok.o replaces copy_process.part.8"
    assert out[1].startswith("pairs:4: refused: changed function proc_meminfo_init is in .init.text")
    assert out[2].startswith("pairs:5: no change found")
    assert out[3] == "pairs:6: error: ORIG missing.o: no such file or directory"
    assert out[4].startswith("pairs:7: error: unrecognized arguments: --no-such-option")
    assert len(out) == 5
    # nothing written for the pairs that failed; the refusal's --json holds its reasons
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.json", "ok.json", "ok.o", "pairs", "refused.json"]
    rep = json.loads((tmp_path / "refused.json").read_text())
    assert rep["result"] == "refused" and rep["exit"] == 2 and "proc_meminfo_init" in rep["reasons"][0]
    batch = json.loads((tmp_path / "batch.json").read_text())
    assert [(b["line"], b["result"], b["exit"]) for b in batch] == [
        (2, "ok", 0), (4, "refused", 2), (5, "no change", 3), (6, "error", 1), (7, "error", 1)]
    assert batch[0]["replaced"] == ["copy_process.part.8"]

    # the same pair in a process of its own: the same bytes and the same report
    single = tmp_path / "single"
    single.mkdir()
    r1 = _klpforge("diff", *_pair(ok), "-o", "ok.o", "--json", "ok.json", "-q", cwd=single)
    assert r1.returncode == 0, r1.stderr
    assert (single / "ok.o").read_bytes() == (tmp_path / "ok.o").read_bytes()
    assert (single / "ok.json").read_text() == (tmp_path / "ok.json").read_text()


def test_batch_exit_codes_and_stdin(tmp_path: Path) -> None:
    """Without an error line: a refusal makes the batch exit 2; only no-change pairs exit 3; pairs from stdin."""
    nochange = " ".join(_pair("warn-detect", "PATCHED.FAIL") + ["-o", "same.o"])
    r = _klpforge("diff-batch", "-", stdin=nochange + "\n" + nochange + "\n", cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert [line[:22] for line in r.stdout.splitlines()] == ["stdin:1: no change fou", "stdin:2: no change fou"]
    ok = " ".join(_pair("special-static") + ["-o", "ok.o"])
    refused = " ".join(_pair("meminfo-init", "PATCHED.FAIL") + ["-o", "refused.o"])
    r = _klpforge("diff-batch", "-", stdin="\n".join([ok, nochange, refused]) + "\n", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    r = _klpforge("diff-batch", "-", stdin="\n".join([ok, nochange]) + "\n", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("# only a comment\n\n", "pairs: no pairs (one `klpforge diff` argument list per line)"),
    ("a.o 'b.o -o c.o\n", "pairs:1: No closing quotation"),
])
def test_batch_refuses_a_bad_pairs_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "pairs").write_text(text)
    r = _klpforge("diff-batch", "pairs", "--json", "batch.json", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"klpforge diff-batch: {message}"]
    assert not (tmp_path / "batch.json").exists()
