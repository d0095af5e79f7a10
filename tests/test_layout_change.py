"""A patch that changes a struct's layout is refused, naming the type, what changed and the replaced
functions that use it; a patch that keeps every layout is not (issue 16, "struct layout changes").

Objects compiled by gcc with -g during the run; the layouts come from their DWARF (klpforge/diff/layout.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.diff.layout import layout_changes
from klpforge.diff.model import Object
from klpforge.util.errors import NoChange, UnsafeChange

SRC = r"""
struct dev { @HEAD@ @EXTRA@ @FLAGS@ flags; };
typedef struct { long a; int b; } pair_t;
unsigned long read_flags(struct dev *d) { return d->flags; }
long read_id(struct dev *d) { return d->id; }
long pair_sum(pair_t *p) { return p->a + p->b; }
@FUNC@
"""
HEAD = "int id; struct dev *next;"


def _src(head: str = HEAD, extra: str = "", flags: str = "unsigned", func: str = "") -> str:
    return SRC.replace("@HEAD@", head).replace("@EXTRA@", extra).replace("@FLAGS@", flags).replace("@FUNC@", func)


def _diff(cc, tmp_path: Path, **patched: str):
    a = cc(_src(), "a", "-g")
    b = cc(_src(**patched), "b", "-g")
    return a, b, (lambda: run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={})))


def test_member_added_is_refused(cc, tmp_path: Path) -> None:
    a, b, run = _diff(cc, tmp_path, extra="long extra;")
    with pytest.raises(UnsafeChange, match=r"^struct dev changes layout \(member extra added at offset 16 "
                       r"\(long int, 8 bytes\); member flags moved from offset 16 to 24; size 24 -> 32 bytes\); "
                       r"used by the replaced read_flags: "):
        run()
    assert not (tmp_path / "lp.o").exists()
    ch = layout_changes(Object.load(a), Object.load(b))
    assert ch is not None and [c.layout.name for c in ch] == ["struct dev"]
    assert ch[0].users == ("read_flags", "read_id")  # both take a struct dev *; only one is replaced


def test_member_widened_is_refused(cc, tmp_path: Path) -> None:
    _, _, run = _diff(cc, tmp_path, flags="unsigned long")
    with pytest.raises(UnsafeChange, match=r"struct dev changes layout \(member flags resized: unsigned int "
                       r"\(4 bytes\) -> long unsigned int \(8 bytes\)\); used by the replaced read_flags"):
        run()


def test_members_reordered_is_refused(cc, tmp_path: Path) -> None:
    _, _, run = _diff(cc, tmp_path, head="struct dev *next; int id;")
    with pytest.raises(UnsafeChange, match=r"struct dev changes layout \(member id moved from offset 0 to 8; "
                       r"member next moved from offset 8 to 0; member flags moved from offset 16 to 12; "
                       r"size 24 -> 16 bytes\); "
                       r"used by the replaced read_flags, read_id: "):
        run()


def test_added_function_keeps_layout(cc, tmp_path: Path) -> None:
    a, b, run = _diff(cc, tmp_path, func="long added(struct dev *d) { return d->id + 2; }")
    res = run()
    assert res.new == ["added"]
    assert layout_changes(Object.load(a), Object.load(b)) == []


def test_comment_keeps_layout(cc, tmp_path: Path) -> None:
    a = cc(_src(), "a", "-g")
    b = cc("/* a comment\n * on two lines */\n" + _src(), "b", "-g")
    assert layout_changes(Object.load(a), Object.load(b)) == []
    with pytest.raises(NoChange):
        run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))


def test_no_dwarf_is_not_checked(cc) -> None:
    assert layout_changes(Object.load(cc(_src(), "a")), Object.load(cc(_src(extra="long x;"), "b"))) is None


BITS = r"""
struct opts { unsigned int ro : 1; unsigned int mode : @W@; unsigned int sync : 1; union { int fd; long pad; }; };
unsigned int get_sync(struct opts *o) { return o->sync + o->fd; }
"""


def test_bit_field_widened_is_refused(cc, tmp_path: Path) -> None:
    """A bit field made wider moves the bit fields after it (DWARF 5 DW_AT_data_bit_offset); anonymous union
    members are part of their parent."""
    a = cc(BITS.replace("@W@", "3"), "a", "-g")
    b = cc(BITS.replace("@W@", "5"), "b", "-g")
    ch = layout_changes(Object.load(a), Object.load(b))
    assert ch is not None and [c.layout.name for c in ch] == ["struct opts"]
    assert [m.name for m in ch[0].layout.members] == ["ro", "mode", "sync", "fd", "pad"]
    with pytest.raises(UnsafeChange, match=r"^struct opts changes layout \(member mode resized: 3 bits -> 5 bits; "
                       r"member sync moved from offset 0 bit 4 to 0 bit 6\); used by the replaced get_sync: "):
        run_diff(a, b, tmp_path / "lp.o", DiffOptions(symtab=a, env={}))


def test_member_type_renamed_at_same_size_keeps_layout(cc) -> None:
    """int -> unsigned int: same place and size; what the code does with it is the code diff's business."""
    a = cc(_src(), "a", "-g")
    b = cc(_src(head="unsigned int id; struct dev *next;"), "b", "-g")
    assert layout_changes(Object.load(a), Object.load(b)) == []
