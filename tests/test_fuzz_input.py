"""Damaged objects (seeded random corruption of real peer objects) never crash the diff: it either
succeeds or raises a KlpError with a one-line message, which the CLI prints with exit 1/2/3."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.errors import KlpError

from .conftest import PEER

CASES = [("x86_64", "cold-add2"), ("ppc64le", "function-ptr-new"), ("s390x", "new-function"),
         ("aarch64", "new-function")]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    end = "<" if b[5] == 1 else ">"
    shoff = struct.unpack_from(end + "Q", b, 0x28)[0]
    shnum = struct.unpack_from(end + "H", b, 0x3C)[0]
    r = rng.random()
    if r < 0.4:  # a section header field
        off = shoff + rng.randrange(1, shnum) * 64 + rng.choice([4, 8, 24, 32, 40, 44, 48, 56])
        b[off:off + 4] = rng.randbytes(4)
    elif r < 0.7:  # tables in the second half of the file (symbols, relocations, strings)
        j = rng.randrange(len(b) // 2, len(b) - 8)
        b[j:j + 8] = rng.randbytes(8)
    else:
        b[rng.randrange(0x40, len(b))] = rng.randrange(256)
    return bytes(b)


@pytest.mark.parametrize("arch,case", CASES, ids=[f"{a}/{c}" for a, c in CASES])
@pytest.mark.parametrize("side", ["orig", "patched"])
def test_corrupted_objects_fail_cleanly(arch: str, case: str, side: str, tmp_path: Path) -> None:
    orig, patched = PEER / arch / f"{case}.ORIG.o", PEER / arch / f"{case}.PATCHED.o"
    if not orig.exists():
        pytest.skip("peer objects not present")
    rng = random.Random(f"{arch}/{case}/{side}")
    src = (orig if side == "orig" else patched).read_bytes()
    bad = tmp_path / "bad.o"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(50):
        bad.write_bytes(_mutate(src, rng))
        a, b = (bad, patched) if side == "orig" else (orig, bad)
        out = tmp_path / "lp.o"
        try:
            run_diff(a, b, out, DiffOptions(symtab=orig, env={}))
            outcomes["ok"] += 1
        except KlpError as e:
            outcomes["error"] += 1
            assert str(e) and "\n" not in str(e)
            assert not out.exists()  # a refused run writes nothing
        out.unlink(missing_ok=True)
    assert outcomes["error"] > 0  # the corruption is real: some runs must be refused
