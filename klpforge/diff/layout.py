"""Struct and union layouts from DWARF, original against patched: a live patch must not change them.

Replaced code runs on objects the running kernel allocated with the old layout, and code that is not
replaced keeps using the old layout on objects new code fills in. So when the patched object's DWARF gives
a struct or union of the original a different layout (a member added, removed, moved, or resized) and the
live patch replaces functions of that object, the change is refused, naming the type, what changed and the
replaced functions that use it (their parameters or variables have the type, through pointers, typedefs,
qualifiers and arrays). The issue's case is a revert in 6.1 ``drivers/virtio/virtio_mmio.c`` that changes
``struct virtio_mmio_device``; Xen's ``struct hvm_domain`` is the same kind.

Only the CUs' top-level named types (and anonymous ones named by a typedef) are read, with their direct
members; anonymous struct/union members are flattened into their parent. Reading uses
:func:`klpforge.diff.dwarfread.dwarf_info` (relocations applied with numpy): about 0.9 s of CPU for 6.1's
``fs/ext4/super.o`` with Debian's config (bench/bench_dwarf.py), linear in the DWARF's size. Objects
without DWARF (no ``-g``) are not checked; DWARF that cannot be read is a warning in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dwarfread import addr_target, dwarf_info
from .model import Object

__all__ = ["Member", "Layout", "LayoutChange", "layouts", "layout_changes", "layout_refusals"]

_QUALS = ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
          "DW_TAG_atomic_type")
_AGG = ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_class_type")


@dataclass(frozen=True)
class Member:
    """One member: name ('' for none), byte offset, bit offset and size for bit fields (-1 otherwise),
    size in bytes of its type, and the type as C spells it (for messages)."""

    name: str
    offset: int
    bit_offset: int
    bit_size: int
    size: int
    type: str


@dataclass(frozen=True)
class Layout:
    """A struct or union: ``kind`` ('struct'/'union'), tag or typedef name, size in bytes, members in
    declaration order (anonymous members flattened, offsets absolute)."""

    kind: str
    name: str
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class LayoutChange:
    """A type whose layout differs: ``what`` lists the differences, ``users`` the functions of the
    patched object whose parameters or variables have it."""

    layout: Layout
    what: tuple[str, ...]
    users: tuple[str, ...]


def _name(die: Any) -> str:
    a = die.attributes.get("DW_AT_name")
    return a.value.decode(errors="replace") if a is not None else ""


def _ref(die: Any) -> Any:
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def _size_and_name(die: Any, depth: int = 0) -> tuple[int, str]:
    """Size in bytes and C spelling of the type DIE ``die`` (None: void)."""
    if die is None:
        return 0, "void"
    if depth > 32:
        return -1, "?"
    tag = die.tag
    if tag == "DW_TAG_pointer_type":
        t = _ref(die)
        inner = _size_and_name(t, depth + 1)[1] if t is not None else "void"
        return int(die.cu["address_size"]), inner + " *"
    if tag in _QUALS:
        size, inner = _size_and_name(_ref(die), depth + 1)
        return size, (_name(die) or inner) if tag == "DW_TAG_typedef" else inner
    if tag == "DW_TAG_array_type":
        size, inner = _size_and_name(_ref(die), depth + 1)
        n = 1
        dims = ""
        for c in die.iter_children():
            if c.tag != "DW_TAG_subrange_type":
                continue
            if "DW_AT_count" in c.attributes:
                k = int(c.attributes["DW_AT_count"].value)
            elif "DW_AT_upper_bound" in c.attributes and isinstance(c.attributes["DW_AT_upper_bound"].value, int):
                k = int(c.attributes["DW_AT_upper_bound"].value) + 1
            else:
                k = 0  # flexible array member
            n *= k
            dims += f"[{k}]"
        return size * n, inner + dims
    size = int(die.attributes["DW_AT_byte_size"].value) if "DW_AT_byte_size" in die.attributes else 0
    prefix = {"DW_TAG_structure_type": "struct ", "DW_TAG_union_type": "union ", "DW_TAG_enumeration_type": "enum "}
    return size, prefix.get(tag, "") + (_name(die) or "<anonymous>")


def _location(attr: Any) -> int:
    v = attr.value
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v and v[0] == 0x23:  # DW_OP_plus_uconst ULEB (DWARF 2/3)
        n, shift = 0, 0
        for b in v[1:]:
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return n
    return -1


def _members(die: Any, base: int, out: list[Member]) -> None:
    for c in die.iter_children():
        if c.tag != "DW_TAG_member":
            continue
        a = c.attributes
        off = base + (_location(a["DW_AT_data_member_location"]) if "DW_AT_data_member_location" in a else 0)
        t = _ref(c)
        name = _name(c)
        if not name and t is not None:
            u = t
            while u is not None and u.tag in _QUALS:
                u = _ref(u)
            if u is not None and u.tag in _AGG and not _name(u):
                _members(u, off, out)  # anonymous struct/union: its members are the parent's
                continue
        size, tname = _size_and_name(t)
        bit_off = int(a["DW_AT_data_bit_offset"].value) if "DW_AT_data_bit_offset" in a else \
            int(a["DW_AT_bit_offset"].value) if "DW_AT_bit_offset" in a else -1
        bit_size = int(a["DW_AT_bit_size"].value) if "DW_AT_bit_size" in a else -1
        out.append(Member(name, off, bit_off, bit_size, size, tname))


def layouts(obj: Object) -> dict[str, Layout] | None:
    """Named struct/union layouts of ``obj``'s DWARF: ``'struct foo'``/``'union bar'`` (or the typedef
    name of an anonymous one) -> :class:`Layout`; None when ``obj`` has no DWARF. A name defined with
    two layouts in one object (block-scope types) is left out: it cannot be paired."""
    info = dwarf_info(obj)
    if info is None:
        return None
    out: dict[str, Layout] = {}
    clash: set[str] = set()
    for cu in info.iter_CUs():
        for die in cu.get_top_DIE().iter_children():
            tag = die.tag
            if tag == "DW_TAG_typedef":
                t = _ref(die)
                if t is None or t.tag not in _AGG or _name(t):
                    continue
                name, agg = _name(die), t
            elif tag in _AGG:
                if not _name(die):
                    continue
                name, agg = "", die
            else:
                continue
            if "DW_AT_declaration" in agg.attributes:
                continue
            kind = "union" if agg.tag == "DW_TAG_union_type" else "struct"
            key = name or f"{kind} {_name(agg)}"
            mem: list[Member] = []
            _members(agg, 0, mem)
            size = int(agg.attributes["DW_AT_byte_size"].value) if "DW_AT_byte_size" in agg.attributes else 0
            lay = Layout(kind, key, size, tuple(mem))
            if key in out and out[key] != lay:
                clash.add(key)
            out[key] = lay
    for k in clash:
        del out[k]
    return out


def _where(m: Member) -> str:
    """A member's place: ``8``, or ``0 bit 4`` for a bit field (DWARF 5 ``DW_AT_data_bit_offset`` counts
    from the start of the struct; DWARF 4 ``DW_AT_bit_offset`` from the storage unit's high bit)."""
    return str(m.offset) if m.bit_offset < 0 else f"{m.offset} bit {m.bit_offset}"


def _bits(m: Member) -> str:
    return f"{m.bit_size} bits" if m.bit_size >= 0 else f"{m.type} ({m.size} bytes)"


def _differences(a: Layout, b: Layout) -> tuple[str, ...]:
    """What changed from ``a`` to ``b``, in words (one item per member)."""
    what: list[str] = []
    am = {m.name: m for m in a.members if m.name}
    bm = {m.name: m for m in b.members if m.name}
    for m in b.members:
        if m.name and m.name not in am:
            what.append(f"member {m.name} added at offset {m.offset} ({m.type}, {m.size} bytes)")
    for m in a.members:
        if m.name and m.name not in bm:
            what.append(f"member {m.name} removed (was at offset {m.offset})")
    for name, x in am.items():
        y = bm.get(name)
        if y is None:
            continue
        if x.size != y.size:
            what.append(f"member {name} resized: {x.type} ({x.size} bytes) -> {y.type} ({y.size} bytes)")
        if x.bit_size != y.bit_size:
            what.append(f"member {name} resized: {_bits(x)} -> {_bits(y)}")
        if (x.offset, x.bit_offset) != (y.offset, y.bit_offset):
            what.append(f"member {name} moved from offset {_where(x)} to {_where(y)}")
    if a.size != b.size:
        what.append(f"size {a.size} -> {b.size} bytes")
    if not what and [_shape(m) for m in a.members] != [_shape(m) for m in b.members]:
        what.append("unnamed members changed")  # padding bit fields (``int :3``); a renamed type is no change
    return tuple(what)


def _shape(m: Member) -> tuple[str, int, int, int, int]:
    return m.name, m.offset, m.bit_offset, m.bit_size, m.size


def _users(obj: Object, names: set[str]) -> dict[str, set[str]]:
    """Type key -> names of ``obj``'s functions whose parameters or variables (any depth, inlined ones
    through their abstract origin) have that type through pointers, typedefs, qualifiers and arrays."""
    info = dwarf_info(obj)
    out: dict[str, set[str]] = {n: set() for n in names}
    if info is None:
        return out
    memo: dict[int, str] = {}

    def key_of(t: Any) -> str:
        if t is None:
            return ""
        if t.offset in memo:
            return memo[t.offset]
        memo[t.offset] = ""
        k = ""
        u, depth = t, 0
        while u is not None and depth < 32:
            if u.tag in _AGG:
                n = _name(u)
                k = f"{'union' if u.tag == 'DW_TAG_union_type' else 'struct'} {n}" if n else ""
                break
            if u.tag == "DW_TAG_typedef" and _name(u) in names:
                k = _name(u)
                break
            if u.tag not in (*_QUALS, "DW_TAG_pointer_type", "DW_TAG_array_type"):
                break
            u, depth = _ref(u), depth + 1
        memo[t.offset] = k
        return k

    for cu in info.iter_CUs():
        for die in cu.get_top_DIE().iter_children():
            if die.tag != "DW_TAG_subprogram" or "DW_AT_low_pc" not in die.attributes:
                continue
            sec, off = addr_target(obj, die.attributes["DW_AT_low_pc"].offset)
            fname = ""
            if sec > 0:
                s = obj.symbol_at(sec, off)
                fname = obj.sym_names[s] if s >= 0 and int(obj.value[s]) == off else ""
            if not fname:
                origin = die.get_DIE_from_attribute("DW_AT_abstract_origin") \
                    if "DW_AT_abstract_origin" in die.attributes else die
                fname = _name(origin)
            stack = list(die.iter_children())
            while stack:
                c = stack.pop()
                if c.tag in ("DW_TAG_formal_parameter", "DW_TAG_variable"):
                    t = _ref(c)
                    if t is None and "DW_AT_abstract_origin" in c.attributes:
                        t = _ref(c.get_DIE_from_attribute("DW_AT_abstract_origin"))
                    k = key_of(t)
                    if k in out:
                        out[k].add(fname)
                elif c.has_children:
                    stack.extend(c.iter_children())
    return out


def layout_changes(orig: Object, patched: Object) -> list[LayoutChange] | None:
    """The struct/union types of both objects whose layout differs (sorted by name), with the patched
    object's functions that use each; None when either object has no DWARF."""
    a, b = layouts(orig), layouts(patched)
    if a is None or b is None:
        return None
    changed = {k: _differences(a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}
    changed = {k: w for k, w in changed.items() if w}
    if not changed:
        return []
    users = _users(patched, set(changed))
    return [LayoutChange(b[k], w, tuple(sorted(users[k]))) for k, w in changed.items()]


def layout_refusals(orig: Object, patched: Object, replaced: list[str], warnings: list[str]) -> list[str]:
    """One refusal per struct/union whose layout the patch changes, when the live patch replaces
    functions of this object (``replaced``, non-empty): the type, what changed, and the replaced
    functions that use it (else all of them: a use through another type's member is not visible in the
    functions' variables, so it is never taken as "unused"). Empty without DWARF; DWARF that pyelftools
    cannot read leaves the check undone, said in ``warnings`` (the report's)."""
    if not replaced:
        return []
    try:
        changes = layout_changes(orig, patched)
    except Exception as e:  # noqa: BLE001 - unreadable DWARF: the check is not done, and the report says so
        warnings.append(f"struct layouts not compared: cannot read the DWARF ({type(e).__name__}: {str(e)[:120]})")
        return []
    out = []
    for c in changes or []:
        users = [f for f in c.users if f in set(replaced)]
        who = f"used by the replaced {', '.join(users)}" if users else \
            f"the live patch replaces {', '.join(replaced)} of this object"
        out.append(f"{c.layout.name} changes layout ({'; '.join(c.what)}); {who}: the running kernel's "
                   "objects and the code not replaced keep the old layout (use a shadow variable instead)")
    return out
