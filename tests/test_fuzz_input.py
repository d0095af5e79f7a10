"""Damaged objects never crash the diff or yield a malformed live patch (issue 8, "How we will know").

Seeded corruption of the real peer objects (``../shared/peer-objs``, all five architectures; the original
object, the patched one, or the original standing in for the target's symbol table), aimed at the ELF
header, section headers, symbols and relocations (:mod:`tests.elf_mutate`), run through the CLI entry
point. Every run must: exit 0, 1, 2 or 3; print exactly one stderr line on failure (naming the damaged
file on exit 1) and none on success; leave no output or temporary file on failure; and on exit 0 write an
object that ``readelf -aW`` reads without a warning and that :func:`klpforge.elf.validate.validate`
accepts. ``KLPFORGE_FUZZ_SEED`` changes the seed (the default is fixed so a failure reproduces);
``bench/bench_fuzz.py`` is the long run.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from .conftest import PEER, peer_cases
from .elf_mutate import Layout, layout, mutate, run_mutated

ARCHES = ["x86_64", "ppc64le", "s390x", "aarch64", "loongarch64"]
RUNS = 27  # per (architecture, side): 405 mutations a run


@pytest.mark.parametrize("side", ["orig", "patched", "symtab"])
@pytest.mark.parametrize("arch", ARCHES)
def test_corrupted_objects_fail_cleanly(arch: str, side: str, tmp_path: Path) -> None:
    cases = [c for c in peer_cases(arch) if c["expect"] == "accept"]
    if not cases:
        pytest.skip("peer objects not present")
    rng = random.Random(f"{os.environ.get('KLPFORGE_FUZZ_SEED', '1')}/{arch}/{side}")
    layouts: dict[Path, Layout] = {}
    codes: Counter[int] = Counter()
    problems = []
    for _ in range(RUNS):
        c = rng.choice(cases)
        orig, patched = PEER / c["orig"], PEER / c["patched"]
        src = patched if side == "patched" else orig
        lay = layouts.get(src) or layouts.setdefault(src, layout(src.read_bytes()))
        data, desc = mutate(lay, rng)
        r = run_mutated(orig, patched, side, data, desc, tmp_path, c["env"])
        codes[r.rc] += 1
        if r.problem:
            problems.append(f"{c['case']} {side} {desc}: exit {r.rc}: {r.problem}: {r.stderr[:300]}")
    assert not problems, "\n".join(problems)
    assert codes[1] > 0  # the corruption is real: some runs are refused
    assert codes[0] > 0  # and some still give a live patch, which was checked
