"""The bulk digest path of compare() agrees with the entry-by-entry path on every peer pair."""

from __future__ import annotations

import pytest

from klpforge.arch import arch_for
from klpforge.compare import compare
from klpforge.correlate import correlate
from klpforge.model import Object

from .conftest import PEER, peer_cases

CASES = [pytest.param(c, id=f"{c['arch']}/{c['case']}") for c in peer_cases()]


@pytest.mark.parametrize("case", CASES)
def test_quick_path_agrees(case: dict) -> None:
    o, p = Object.load(PEER / case["orig"]), Object.load(PEER / case["patched"])
    corr = correlate(o, p)
    arch = arch_for(o.elf.machine)
    fast, slow = compare(corr, arch, quick=True), compare(corr, arch, quick=False)
    assert fast.status == slow.status
    assert fast.line_only == slow.line_only
    assert fast.status  # every pair has functions to judge
