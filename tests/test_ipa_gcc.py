"""impact on C files compiled here with gcc -O2 -fdump-ipa-clones: each IPA transform, checked against the
functions `klpforge diff` puts in the live patch when the helper is edited and rebuilt."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from klpforge.cli import main
from klpforge.ipa import closure_all, find_dumps, load_index, predict
from klpforge.ipa.objsyms import read_symbols

DATA = Path(__file__).parent / "ipa_data"
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
CFLAGS = ["-O2", "-fdump-ipa-clones", "-ffunction-sections", "-fno-asynchronous-unwind-tables"]


def _cc(src: Path, out: Path, extra: list[str] | None = None) -> Path:
    subprocess.run(["gcc", *CFLAGS, *(extra or []), "-c", src.name, "-o", out.name],
                   cwd=out.parent, check=True)
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ipa")
    for name in ("inline", "clones", "icf"):
        shutil.copy(DATA / f"{name}.c", d / f"{name}.c")
        _cc(d / f"{name}.c", d / f"{name}.o")
    return d


def _changed(build: Path, name: str, old: str, new: str, tmp: Path) -> set[str]:
    """What ``klpforge diff`` puts in the live patch when ``old`` becomes ``new`` in ``name.c``."""
    from klpforge.diff import DiffOptions, run_diff

    src = (build / f"{name}.c").read_text()
    assert old in src
    (tmp / "orig").mkdir()
    (tmp / "new").mkdir()
    (tmp / "orig" / f"{name}.c").write_text(src)
    (tmp / "new" / f"{name}.c").write_text(src.replace(old, new))
    fentry = ["-pg", "-mfentry"]  # kernel-like: every function has an ftrace entry
    a = _cc(tmp / "orig" / f"{name}.c", tmp / "orig" / f"{name}.o", fentry)
    b = _cc(tmp / "new" / f"{name}.c", tmp / "new" / f"{name}.o", fentry)
    res = run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))
    return set(res.included_functions)


def _covered(res_functions: set[str], pieces: dict[str, list[str]]) -> set[str]:
    out = set(res_functions)
    for p in pieces.values():
        out |= set(p)
    return out


@pytest.mark.parametrize("name, func, old, new", [
    ("inline", "helper", "v ^ 0x55", "v ^ 0x56"),              # inlining
    ("inline", "leaf", "x * 3 + sink", "x * 5 + sink"),        # nested inlining leaf -> mid -> top
    ("clones", "slow_path", "counter += p[i] * i", "counter += p[i] * (i + 3)"),  # .part
    ("clones", "scale", "(i * factor) ^ counter", "(i * factor) + counter"),   # .constprop
    ("clones", "get_sum", "s += i * counter", "s -= i * counter"),            # .isra
    ("clones", "process", 'report("index", i)', 'report("index", i + 1)'),    # .cold
])
def test_prediction_covers_real_change(build: Path, tmp_path: Path, name: str, func: str, old: str,
                                       new: str) -> None:
    res = predict([build / f"{name}.c.000i.ipa-clones"], [func], use_cache=False)
    pieces = {e.name: e.pieces for e in res.entries if e.status == "replace"}
    changed = _changed(build, name, old, new, tmp_path)
    assert changed, "the edit must change some function"
    assert changed <= _covered(res.functions, pieces), (changed, res.functions)


def test_inline_closure_is_transitive(build: Path) -> None:
    res = predict([build], ["leaf"], use_cache=False)
    assert res.functions == {"top_a", "top_b"}
    top_a = res.reasons("top_a")[0]
    assert [s.text().split(" (")[0] for s in top_a.chain] == [
        "`leaf` inlined into `mid`", "`mid` inlined into `top_a`"]
    assert top_a.chain[-1].dst_loc.endswith("inline.c:14")
    assert res.reasons("mid")[0].status == "removed"
    assert top_a.avoided_by == []  # static inlining stays under every -flive-patching mode


def test_clones_bring_their_callers(build: Path) -> None:
    res = predict([build], ["clones.c:scale", "get_sum"], use_cache=False)
    assert {"scale.constprop.0", "use_scale1", "use_scale2", "get_sum.isra.0", "use_sum1",
            "use_sum2"} == res.functions
    # scale was replaced by its clone and GCC wrote no removal record: the symbol table tells
    assert res.reasons("scale")[0].status == "missing"
    caller = res.reasons("use_scale1")[0]
    assert [s.kind for s in caller.chain] == ["constprop", "caller-of-clone"]
    assert caller.avoided_by == ["inline-only-static"]
    assert caller.loc == "in clones.o"  # no dump names it: its object, never a bare "?"


def test_part_cold_and_global_inline(build: Path) -> None:
    res = predict([build], ["slow_path", "process"], use_cache=False)
    assert {"slow_path", "slow_path.part.0", "user1", "process"} <= res.functions
    assert res.reasons("process")[0].pieces == ["process.cold"]
    user1 = res.reasons("user1")[0]
    assert user1.chain[0].kind == "inline-global"
    assert "inline-only-static" in user1.avoided_by


def test_icf_alias_reported(build: Path) -> None:
    syms = {s.name: s for s in read_symbols(build / "icf.o")}
    if syms["s_a"].value != syms["s_b"].value or syms["s_a"].shndx != syms["s_b"].shndx:
        pytest.skip("this gcc did not fold s_a and s_b")
    res = predict([build], ["s_b"], use_cache=False)
    # separate functions sharing one address, not a piece of s_b (issue 12 item 3)
    assert res.reasons("s_b")[0].folded == ["s_a"] and res.reasons("s_b")[0].pieces == []


def test_lto_link_dumps(tmp_path: Path) -> None:
    for n in ("lto_a", "lto_b"):
        shutil.copy(DATA / f"{n}.c", tmp_path)
        subprocess.run(["gcc", "-O2", "-flto", "-fdump-ipa-clones", "-c", f"{n}.c"], cwd=tmp_path, check=True)
    subprocess.run(["gcc", "-O2", "-flto", "-fdump-ipa-clones", "lto_a.o", "lto_b.o", "-o", "prog"],
                   cwd=tmp_path, check=True)
    dumps = find_dumps(tmp_path)
    assert any(".wpa." in d.name for d in dumps)
    res = predict([tmp_path], ["a_helper"], use_cache=False)
    # a_helper -> a_util at compile time, a_util -> main at link time (the wpa dump)
    main_e = res.reasons("main")[0]
    assert [s.kind.split("-")[0] for s in main_e.chain] == ["inline", "inline"]
    assert main_e.status == "replace" and main_e.obj.endswith("prog")
    assert res.reasons("a_util")[0].status == "missing"


def test_lto_prediction_covers_real_change(tmp_path: Path) -> None:
    """LTO: the compile- and link-time (wpa, ltrans) dumps of an LTO relocatable link predict what diff finds
    in it (a relocatable link keeps a_util visible, so here it stays out of main)."""
    from klpforge.diff import DiffOptions, run_diff

    flags = ["-O2", "-flto", "-ffunction-sections", "-pg", "-mfentry", "-fdump-ipa-clones"]
    objs = {}
    for tag, k in (("orig", "5"), ("new", "7")):
        d = tmp_path / tag
        d.mkdir()
        for n in ("lto_a", "lto_b"):
            (d / f"{n}.c").write_text((DATA / f"{n}.c").read_text().replace("x * 5", f"x * {k}"))
            subprocess.run(["gcc", *flags, "-c", f"{n}.c"], cwd=d, check=True)
        subprocess.run(["gcc", *flags, "-r", "-nostdlib", "-flinker-output=nolto-rel", "lto_a.o", "lto_b.o",
                        "-o", "prog.o"], cwd=d, check=True)
        objs[tag] = d / "prog.o"
    res = run_diff(objs["orig"], objs["new"], tmp_path / "lp.o", DiffOptions(symtab=objs["orig"], env={}))
    changed = set(res.included_functions)
    assert changed == {"a_util"}
    assert any(".wpa." in d.name for d in find_dumps(tmp_path / "orig"))
    pred = predict([tmp_path / "orig"], ["a_helper"], use_cache=False)
    pieces = {e.name: e.pieces for e in pred.entries if e.status == "replace"}
    assert changed <= _covered(pred.functions, pieces), (changed, pred.functions)


def test_closure_all_matches_queries(build: Path) -> None:
    idx = load_index(find_dumps(build), use_cache=False)
    src, dst = closure_all(idx)
    name = lambda n: idx.names[int(idx.f_name[idx.n_func[n]])]  # noqa: E731
    pairs = {(name(a), name(b)) for a, b in zip(src.tolist(), dst.tolist(), strict=True)}
    assert {("leaf", "mid"), ("leaf", "top_a"), ("leaf", "top_b"), ("mid", "top_a")} <= pairs
    assert ("helper", "top_a") not in pairs


def test_cli_text_json_dot(build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["impact", "--dumps", str(build), "--no-cache", "helper"]) == 0
    out = capsys.readouterr().out
    assert "`helper` inlined into `caller_a`" in out and "replace: caller_a caller_b" in out
    dot = tmp_path / "g.dot"
    assert main(["impact", "--dumps", str(build), "--no-cache", "--json", "--dot", str(dot), "leaf"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["functions"] == ["top_a", "top_b"]
    assert '"leaf\\n' in dot.read_text() and "->" in dot.read_text()
    if shutil.which("dot"):
        svg = tmp_path / "g.svg"
        assert main(["impact", "--dumps", str(build), "--no-cache", "--svg", str(svg), "leaf"]) == 0
        assert svg.read_text().lstrip().startswith("<?xml")


def test_cli_unknown_function(build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["impact", "--dumps", str(build), "--no-cache", "no_such_fn"]) == 1
    assert "no_such_fn: no function of that name" in capsys.readouterr().err


def test_patch_maps_hunks_to_functions(build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = (DATA / "inline.c").read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(src) if "x * 3 + sink" in line)
    patch = tmp_path / "fix.patch"
    patch.write_text(f"--- a/inline.c\n+++ b/inline.c\n@@ -{i},3 +{i},3 @@\n {src[i - 1]}-{src[i]}"
                     f"+{src[i].replace('x * 3', 'x * 4')} {src[i + 1]}")
    rc = main(["impact", "--dumps", str(build), "--no-cache", "--json", "--patch", str(patch),
               "--source", str(DATA)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["functions"] == ["top_a", "top_b"]


def test_clang_style_build_falls_back_to_dwarf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(DATA / "inline.c", tmp_path)
    subprocess.run(["gcc", "-O2", "-g", "-c", "inline.c"], cwd=tmp_path, check=True)  # no dump written
    assert main(["impact", "--dumps", str(tmp_path), "--no-cache", "leaf"]) == 0
    out = capsys.readouterr().out
    assert "no ipa-clones dumps under" in out and "replace: top_a top_b" in out


def test_patch_mapped_with_dwarf_line_table_without_source(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # built with -g: the hunks are mapped from the object's line table, no source tree (--source) needed
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(DATA / "inline.c", build)
    _cc(build / "inline.c", build / "inline.o", ["-g"])
    src = (DATA / "inline.c").read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(src) if "x * 3 + sink" in line)  # in leaf, 0-based
    patch = tmp_path / "fix.patch"
    patch.write_text(f"--- a/inline.c\n+++ b/inline.c\n@@ -{i},3 +{i},3 @@\n {src[i - 1]}-{src[i]}"
                     f"+{src[i].replace('x * 3', 'x * 4')} {src[i + 1]}")
    nosrc = tmp_path / "no-source"
    nosrc.mkdir()
    assert main(["impact", "--dumps", str(build), "--no-cache", "--json", "--patch", str(patch),
                 "--source", str(nosrc)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["queries"] == ["inline.c:leaf"]
    assert doc["functions"] == ["top_a", "top_b"]
    assert any("DWARF line table" in n for n in doc["notes"])


def test_dwarf_extents_follow_function_bodies(tmp_path: Path) -> None:
    from klpforge.ipa.dwarflines import function_extents, functions_at_lines

    shutil.copy(DATA / "inline.c", tmp_path)
    obj = _cc(tmp_path / "inline.c", tmp_path / "inline.o", ["-g"])
    lines = (DATA / "inline.c").read_text().splitlines()
    at = {name: next(n for n, t in enumerate(lines, 1) if t.startswith(("static int " + name, "int " + name)))
          for name in ("leaf", "mid", "top_a", "helper")}
    ext = {n: (lo, hi) for f, e in function_extents(obj).items() if f.endswith("inline.c") for n, lo, hi in e}
    assert ext["leaf"][0] == at["leaf"] and ext["leaf"][1] < at["mid"]  # inlined-only leaf has a body too
    assert ext["mid"][0] == at["mid"]
    assert functions_at_lines(obj, "inline.c", {at["top_a"] + 2}) == ["top_a"]
    assert functions_at_lines(obj, "inline.c", {at["helper"] - 1}) == []  # the blank line between functions
    assert functions_at_lines(obj, "inline.c", {2}) == []  # `int sink;`: not in any function
