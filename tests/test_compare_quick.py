"""The bulk digest path of compare() agrees with the entry-by-entry path on every peer pair."""

from __future__ import annotations

import pytest

from klpforge.diff.arch import arch_for
from klpforge.diff.compare import compare
from klpforge.diff.correlate import correlate
from klpforge.diff.model import Object

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


def _per_entry_keys(keys, obj):  # type: ignore[no-untyped-def]
    rel, relsec, _ = obj.all_relocs
    return [keys.key(obj, int(x["sym"]), int(x["type"]), int(x["addend"]), (int(s), int(x["offset"])))
            for x, s in zip(rel, relsec, strict=True)]


@pytest.mark.parametrize("case", CASES[::5])
def test_bulk_relocation_keys_equal_per_entry_keys(case: dict) -> None:
    from klpforge.diff.compare import TargetKeys

    o, p = Object.load(PEER / case["orig"]), Object.load(PEER / case["patched"])
    keys = TargetKeys(correlate(o, p), arch_for(o.elf.machine))
    for obj in (o, p):
        _, _, kid, add = keys.object_keys(obj)
        bulk = [(keys.key_of(int(k)), int(a)) for k, a in zip(kid, add, strict=True)]
        assert bulk == _per_entry_keys(keys, obj)


def test_bulk_keys_without_function_sections(cc) -> None:  # type: ignore[no-untyped-def]
    from klpforge.diff.compare import TargetKeys

    src = "".join(f"static int s{i}(int x) {{ return x * {i}; }}\n" for i in range(40))
    src += "int (*tab[])(int) = {" + ", ".join(f"s{i}" for i in range(40)) + "};\n"
    src += "int g(int x) { return tab[x](x) + s3(x) + s7(x); }\n"
    a = cc(src, "nofs", "-fno-function-sections", "-fno-data-sections", "-fno-inline")
    o = Object.load(a)
    text = o.find_section(".text")
    assert text is not None and len(o.syms_in_section[text]) > 16
    keys = TargetKeys(correlate(o, Object.load(a)), arch_for(o.elf.machine))
    _, _, kid, add = keys.object_keys(o)
    bulk = [(keys.key_of(int(k)), int(a_)) for k, a_ in zip(kid, add, strict=True)]
    assert bulk == _per_entry_keys(keys, o)
