"""Read-only statics folded by identical code folding are one object with several names (issue 16 item 6).

GCC's ``-fipa-icf`` merges two functions' identical ``static const char access_str[]`` into one object that
carries both names at one place (kvm's ``access_str.18``/``access_str.19``). They pair as one object: no
refusal, no spurious changed function. Compiled by gcc during the run.
"""

from __future__ import annotations

from pathlib import Path

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.model import Object

SRC = """
extern int printk(const char *, ...);
int f1(int x) { static const char access_str[] = "---RWX-X"; return printk("%c", access_str[x & 7]); }
int f2(int x) { static const char access_str[] = "---RWX-X"; return printk("%c %d", access_str[x & 7], K); }
int f3(int x) { return x + 1; }
"""


def test_folded_statics_pair_as_one_object(cc, tmp_path: Path) -> None:
    a, b = cc(SRC.replace("K", "1"), "a"), cc(SRC.replace("K", "2"), "b")
    o = Object.load(a)
    names = [n for n in o.sym_names if n.startswith("access_str.")]
    places = {(int(o.shndx[o.sym_names.index(n)]), int(o.value[o.sym_names.index(n)])) for n in names}
    assert len(names) == 2 and len(places) == 1  # the input really is folded
    res = run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))
    assert [f.old_name for f in res.patched_functions] == ["f2"]
    assert [c["name"] for c in res.report["changed"]] == ["f2"]
    pairs = {c["orig"]: c["why"] for c in res.report["correlation"] if c["orig"].startswith("access_str.")}
    assert len(pairs) == 2 and any("folded static" in w for w in pairs.values())
    assert not [i for i in res.report["included"] if i["name"].startswith("access_str")]  # the kernel's is used


def test_folded_statics_no_change(cc, tmp_path: Path) -> None:
    import pytest

    from klpforge.util.errors import NoChange

    a, b = cc(SRC.replace("K", "1"), "a"), cc("/* moved */\n" + SRC.replace("K", "1"), "b")
    with pytest.raises(NoChange):
        run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))
