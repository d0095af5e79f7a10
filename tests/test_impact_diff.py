"""``klpforge diff --impact``: C compiled here twice (original, patched) with kernel-like flags and
``-fdump-ipa-clones``; the CLI's JSON report says which changed functions the dumps predicted, and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

DATA = Path(__file__).parent / "ipa_data"


def _diff_impact(cc, orig: str, patched: str, tmp: Path, dumps: str = "a") -> tuple[dict, str]:
    a = cc(orig, "a", "-fdump-ipa-clones")
    b = cc(patched, "b", "-fdump-ipa-clones")
    assert (a.parent / "unit.c.000i.ipa-clones").exists()
    rep = tmp / "report.json"
    p = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(tmp / "lp.o"),
                        "--symtab", str(a), "--json", str(rep), "--impact", str(tmp / dumps)],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(rep.read_text()), p.stdout


def test_split_part_is_predicted_and_inlined_header_reported_unchanged(cc, tmp_path: Path) -> None:
    src = (DATA / "clones.c").read_text()
    doc, out = _diff_impact(cc, src, src.replace("counter += p[i] * i;", "counter += p[i] * (i + 3);"), tmp_path)
    imp = doc["impact"]
    changed = {c["name"] for c in doc["changed"]}
    assert "slow_path.part.0" in changed
    assert imp["seeds"] == ["slow_path"]
    assert imp["unpredicted"] == []
    row = next(r for r in imp["changed"] if r["name"] == "slow_path.part.0")
    assert row["predicted"] and row["seed"] == "slow_path" and row["transforms"] == ["part"]
    assert row["chain"][0].startswith("`slow_path` split (partial inlining) into `slow_path.part.0`")
    assert row["avoided_by"] == ["inline-only-static"]
    # user1 holds slow_path's inlined test, which the edit did not touch
    pu = {p["name"]: p for p in imp["predicted_unchanged"]}
    assert "user1" in pu and "inlined copy compiled to identical code" in pu["user1"]["reason"]
    assert pu["user1"]["chain"] == ["`slow_path` inlined into `user1` (unit.c:21)"]
    assert "impact (ipa-clones): 1/1 changed functions predicted; seeds: slow_path" in out


CONSTPROP = """
extern void log_event(const char *msg, int v);
int counter;
static __attribute__((noinline)) int scale(int v, int factor)
{
    int r = 0;
    for (int i = 0; i < v; i++)
        r += (i * factor) ^ counter;
    log_event("scale", r);
    return r;
}
int use_scale1(int v) { return scale(v, 7); }
int use_scale2(int v) { return scale(v + 1, 7); }
"""


def test_constprop_clone_predicted_from_its_original(cc, tmp_path: Path) -> None:
    doc, _ = _diff_impact(cc, CONSTPROP, CONSTPROP.replace("^ counter", "+ counter"), tmp_path)
    imp = doc["impact"]
    rows = {r["name"]: r for r in imp["changed"]}
    assert set(rows) == {"scale.constprop.0"}
    r = rows["scale.constprop.0"]
    assert r["predicted"] and r["seed"] == "scale" and r["transforms"] == ["constprop"]
    assert imp["unpredicted"] == []
    # the callers call the clone; their own code is the same
    assert {p["name"] for p in imp["predicted_unchanged"]} >= {"use_scale1", "use_scale2"}


NESTED = """
int sink;
static int leaf(int x) { return x * 3 + sink; }
static int mid(int x) { return leaf(x) + leaf(x + 1); }
int top_a(int x) { return mid(x) * 2; }
int top_b(int x) { return mid(x) - 7; }
int other(int x) { return x + sink; }
"""


def test_fully_inlined_helper_is_inferred_as_the_source(cc, tmp_path: Path) -> None:
    doc, out = _diff_impact(cc, NESTED, NESTED.replace("x * 3 + sink", "x * 5 + sink"), tmp_path)
    imp = doc["impact"]
    assert {r["name"] for r in imp["changed"]} == {"top_a", "top_b"}
    # the objects alone cannot show leaf changed: both callers are seeds, but leaf (and mid, which holds
    # it) have no code of their own and are inlined into exactly the changed functions
    assert imp["seeds"] == ["top_a", "top_b"]
    assert [s["name"] for s in imp["inferred_sources"]] == ["leaf", "mid"]
    assert imp["inferred_sources"][0]["chains"]["top_a"] == (
        "`leaf` inlined into `mid` (unit.c:4); `mid` inlined into `top_a` (unit.c:5)")
    assert all(r["predicted"] and r["inferred_from"] == ["leaf", "mid"] for r in imp["changed"])
    assert "the edit may be in leaf" in out


PURE = """
int counter;
static __attribute__((noinline)) int f(int x) { return x * 3 + 1; }
int g(int x) { return f(x) + f(x); }
"""


def test_caller_changed_by_pure_const_is_not_predicted(cc, tmp_path: Path) -> None:
    # f stops being const: g can no longer call it once for both uses. No dump record says so.
    doc, out = _diff_impact(cc, PURE, PURE.replace("{ return x * 3 + 1; }", "{ counter++; return x * 3 + 1; }"),
                            tmp_path)
    imp = doc["impact"]
    assert {c["name"] for c in doc["changed"]} == {"f", "g"}
    assert imp["seeds"] == ["f"]
    assert [u["name"] for u in imp["unpredicted"]] == ["g"]
    assert imp["unpredicted"][0]["cause"].startswith("calls changed f: compiled with assumptions about the "
                                                     "callee's body (IPA-RA, pure-const")
    assert "not predicted: g" in out


def test_impact_without_dumps_is_a_clear_error(cc, tmp_path: Path) -> None:
    a = cc(PURE, "a")
    b = cc(PURE.replace("x * 3", "x * 4"), "b")
    empty = tmp_path / "nodumps"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "klpforge", "diff", str(a), str(b), "-o", str(tmp_path / "lp.o"),
                        "--symtab", str(a), "--impact", str(empty)], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    assert p.returncode == 1
    assert "no ipa-clones dumps and no objects found" in p.stderr


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the impact index cache stays per test
