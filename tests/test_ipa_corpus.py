"""impact on the shared Linux 6.1 vmlinux corpus, and bad-input messages."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from klpforge.ipa import find_dumps, load_index, predict
from klpforge.ipa.closure import impact
from klpforge.ipa.dumps import parse_dumps
from klpforge.util.errors import InputError

TARBALL = Path(__file__).resolve().parents[2] / "shared/corpora/linux-6.1-x86_64_defconfig-ipa-clones.tar.xz"
if not TARBALL.exists():
    TARBALL = Path("/work/shared/corpora/linux-6.1-x86_64_defconfig-ipa-clones.tar.xz")


def corpus_dir() -> Path:
    """Unpack the corpus once into the user cache, keyed by the tarball's size and mtime."""
    st = TARBALL.stat()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "klpforge" / "corpora"
    d = base / f"linux-6.1-ipa-{st.st_size}-{int(st.st_mtime)}"
    if not (d / ".done").exists():
        d.mkdir(parents=True, exist_ok=True)
        with tarfile.open(TARBALL) as t:
            t.extractall(d, filter="data")
        (d / ".done").touch()
    return d


@pytest.fixture(scope="module")
def corpus() -> Path:
    if not TARBALL.exists():
        pytest.skip(f"shared corpus not found at {TARBALL}")
    return corpus_dir()


def test_get_current_is_everywhere(corpus: Path) -> None:
    res = predict(corpus, ["get_current"])
    objs = {e.obj for e in res.entries if e.status == "replace"}
    assert len(res.functions) > 1000 and len(objs) > 400
    # the header function is removed wherever it was inlined, never replaced itself
    assert not [e for e in res.reasons("get_current") if e.status == "replace"]
    e = next(iter(res.reasons("in_32bit_syscall")), None)
    assert e is None or e.chain[0].src == "get_current"


def test_removal_records_are_incomplete(corpus: Path) -> None:
    # nf_sockopt_find was replaced by nf_sockopt_find.constprop.0 and has no removal line
    res = predict(corpus, ["net/netfilter/nf_sockopt.c:nf_sockopt_find"])
    assert "nf_sockopt_find.constprop.0" in res.functions
    orig = [e for e in res.reasons("nf_sockopt_find") if e.obj.endswith("nf_sockopt.o.syms")]
    assert orig and orig[0].status == "missing"
    assert any("not computed" in n for n in res.notes)  # .syms files carry no relocations


def test_warm_query_reuses_index(corpus: Path) -> None:
    dumps = find_dumps(corpus)
    a = load_index(dumps)
    b = load_index(dumps)
    assert len(a.e_src) == len(b.e_src) > 200_000
    assert impact(b, ["kernel/sched/core.c:__schedule"]).functions


def _write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


GOOD = "Callgraph clone;helper;0;demo.c;9;12;caller_a;1;demo.c;10;5;inlining to\n"


def test_not_a_dump(tmp_path: Path) -> None:
    p = _write(tmp_path, "x.c.000i.ipa-clones", "int main(void) { return 0; }\n")
    with pytest.raises(InputError, match=r"x\.c\.000i\.ipa-clones:1: not an ipa-clones dump"):
        parse_dumps([p])


def test_truncated_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.c.000i.ipa-clones", GOOD + "Callgraph clone;helper;0;demo.c;9")
    with pytest.raises(InputError, match=r"t\.c\.000i\.ipa-clones:2: truncated clone record \(5 of 12"):
        parse_dumps([p])


def test_unknown_format(tmp_path: Path) -> None:
    p = _write(tmp_path, "u.c.000i.ipa-clones", GOOD * 2 + GOOD.replace(";inlining to", ";x;inlining to"))
    with pytest.raises(InputError, match=r"u\.c\.000i\.ipa-clones:3: unknown clone record format \(13 fields"):
        parse_dumps([p])


def test_bad_number(tmp_path: Path) -> None:
    p = _write(tmp_path, "n.c.000i.ipa-clones", GOOD + GOOD.replace(";9;12;", ";nine;12;"))
    with pytest.raises(InputError, match=r"n\.c\.000i\.ipa-clones:2: line/column 'nine' is not a number"):
        load_index([p], use_cache=False)


def test_binary_file(tmp_path: Path) -> None:
    p = tmp_path / "b.c.000i.ipa-clones"
    p.write_bytes(b"\x7fELF" + b"\x00" * 70000)
    with pytest.raises(InputError, match=r"b\.c\.000i\.ipa-clones:1: not an ipa-clones dump"):
        parse_dumps([p])


def test_old_14_field_format(tmp_path: Path) -> None:
    p = _write(tmp_path, "o.c.000i.ipa-clones",
               "Callgraph clone;helper;3;o.c;4;12;<-;caller;7;o.c;9;5;optimization:;inlining to\n"
               "Callgraph removal;helper;3;o.c;4;12\n")
    res = impact(load_index([p], use_cache=False), ["helper"])
    assert [(e.name, e.status) for e in res.entries] == [("helper", "unknown"), ("caller", "unknown")]
    assert res.entries[1].chain[0].text() == "`helper` inlined into `caller` (o.c:9)"


def test_list_file_and_missing_entry(tmp_path: Path) -> None:
    d = _write(tmp_path, "a.c.000i.ipa-clones", GOOD)
    lst = _write(tmp_path, "dumps.txt", f"{d.name}\n\nmissing.c.000i.ipa-clones\n")
    with pytest.raises(InputError, match=r"dumps\.txt:3: listed dump 'missing\.c\.000i\.ipa-clones' does not"):
        find_dumps(lst)
