"""The closure of a set of functions in one C file: what an extracted live patch source must carry.

tree-sitter-c parses the (patched) file; each top-level item -- ``#include``, macro, type, variable,
function, forward declaration -- is indexed by the names it defines, under the preprocessor conditions
that enclose it. Starting from the functions to replace, the identifiers they use pull in:

- macros, file-local types (struct/union/enum tags, typedefs): copied, with their own closure;
- static functions the compiler inlined or cloned (no symbol of that name in the running kernel), and
  ``static inline`` ones: copied (the compiler inlines them again);
- other functions: a prototype only (``convert`` turns the reference into a klp relocation);
- file-scope variables: an ``extern`` declaration (the running kernel's object, never a copy); a ``const``
  one the compiler folded away (no symbol) is copied; any other without a symbol is refused.

>>> units = parse_items(Path("fs/proc/meminfo.c").read_bytes())
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..util.errors import UnsafeChange

__all__ = ["Item", "parse_items", "Closure", "closure", "identifiers", "HEADER_CONFIG"]

#: DEFINE_* macros that define a file-scope variable, and the type to declare it ``extern`` with (6.1 headers)
DEFINE_TYPES = {"DEFINE_MUTEX": "struct mutex", "DEFINE_SPINLOCK": "spinlock_t",
                "DEFINE_RAW_SPINLOCK": "raw_spinlock_t", "DEFINE_RWLOCK": "rwlock_t",
                "DEFINE_SEMAPHORE": "struct semaphore", "DEFINE_IDA": "struct ida", "DEFINE_IDR": "struct idr",
                "LIST_HEAD": "struct list_head", "DECLARE_WAIT_QUEUE_HEAD": "struct wait_queue_head",
                "DEFINE_STATIC_KEY_FALSE": "struct static_key_false",
                "DEFINE_STATIC_KEY_TRUE": "struct static_key_true"}
_ATTRS = re.compile(rb"\b(__latent_entropy|__randomize_layout|__ro_after_init|__read_mostly|__initdata|"
                    rb"__visible|__noreturn|__cold|__init|__exit|notrace|__must_check|__maybe_unused)\b")
_KEYWORDS = {"struct", "union", "enum", "static", "const", "int", "long", "char", "void", "unsigned", "signed"}
#: macros a file defines for the headers it includes (6.1 include/linux/printk.h ``pr_fmt``,
#: dev_printk.h ``dev_fmt``, dynamic_debug.h ``DEBUG``): the functions use them through header macros
#: (``pr_info``), never by name, so they are copied whenever the file has them
HEADER_CONFIG = frozenset({"pr_fmt", "dev_fmt", "DEBUG", "DYNAMIC_DEBUG_MODULE"})
_DEFINE = re.compile(r"^\s*(static\s+)?(" + "|".join(DEFINE_TYPES) + r")\s*\(\s*(\w+)")


@dataclass
class Item:
    """One top-level item of the file: ``kind`` is include/macro/type/var/func/proto/other."""

    kind: str
    names: list[str]
    text: str
    start: int  # byte offset: source order
    conds: tuple[str, ...] = ()  # enclosing preprocessor conditions, outermost first (``#if X`` lines)
    uses: set[str] = field(default_factory=set)  # identifiers it uses
    sig_uses: set[str] = field(default_factory=set)  # identifiers of a function's signature only
    static: bool = False
    inline: bool = False
    const: bool = False
    proto: str = ""  # func: the declaration without storage class; var: the extern declaration


def _parser() -> Any:
    import tree_sitter
    import tree_sitter_c

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_c.language()))


def identifiers(node: Any) -> set[str]:
    """Identifiers and type names used under ``node`` (not struct field names)."""
    out: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.type in ("identifier", "type_identifier"):
            out.add(n.text.decode())
        elif n.type == "preproc_arg":  # a macro body is not parsed: take its words
            out |= set(re.findall(r"[A-Za-z_]\w*", n.text.decode()))
        stack.extend(n.children)
    return out


def _declared_name(decl: Any) -> str | None:
    while decl is not None:
        if decl.type in ("identifier", "type_identifier"):
            return str(decl.text.decode())
        decl = decl.child_by_field_name("declarator")
    return None


def _is_function_declarator(decl: Any) -> bool:
    while decl is not None:
        if decl.type == "function_declarator":
            return True
        if decl.type == "parenthesized_declarator":
            return False  # a pointer to a function: a variable
        decl = decl.child_by_field_name("declarator")
    return False


def _specifiers(node: Any) -> str:
    return " ".join(c.text.decode() for c in node.children
                    if c.type in ("storage_class_specifier", "type_qualifier", "attribute_specifier",
                                  "function_specifier"))


def _strip_storage(text: str) -> str:
    return re.sub(r"\b(static|inline|__always_inline|noinline|__init|__cold)\b\s*", "", text).strip()


def parse_items(src: bytes, _depth: int = 0) -> list[Item]:
    """The file's top-level items in source order (conditional blocks flattened, their conditions kept).

    Where tree-sitter gives up (an ``ERROR`` node: unbalanced braces across ``#ifdef`` branches, a macro it
    cannot parse swallowing the functions after it) the region is cut after each ``}`` in column 0 (the
    end of a function in kernel style) and each piece is parsed on its own."""
    orig = src
    # attribute macros tree-sitter reads as a type name: blanked (same length: offsets stay) for the parse
    src = _ATTRS.sub(lambda m: b" " * len(m.group(0)), src)
    tree = _parser().parse(src)
    items: list[Item] = []

    def text(n: Any) -> str:
        return orig[n.start_byte:n.end_byte].decode(errors="replace")

    def walk(nodes: Iterable[Any], conds: tuple[str, ...]) -> None:
        for n in nodes:
            t = n.type
            if t in ("preproc_if", "preproc_ifdef", "preproc_elif", "preproc_elifdef"):
                c = n.child_by_field_name("condition")
                name = n.child_by_field_name("name")
                if c is not None:
                    cond = text(c).strip()
                else:
                    neg = text(n).lstrip().startswith(("#ifndef", "#elifndef"))
                    cond = f"{'!' if neg else ''}defined({text(name).strip() if name is not None else '?'})"
                alt = n.child_by_field_name("alternative")
                skip = {x.id for x in (c, name, alt) if x is not None}
                walk([x for x in n.children if x.is_named and x.id not in skip], (*conds, f"#if {cond}"))
                if alt is not None:
                    walk([alt], (*conds, f"#if !({cond})"))
                continue
            if t == "ERROR" and _depth < 2:
                seg = src[n.start_byte:n.end_byte]
                cuts = [m.end() for m in re.finditer(rb"\n}[^\n]*\n", seg)]
                if cuts:
                    prev = 0
                    for cut in [*cuts, len(seg)]:
                        for sub in parse_items(orig[n.start_byte:n.end_byte][prev:cut], _depth + 1):
                            sub.start += n.start_byte + prev
                            sub.conds = conds + sub.conds
                            items.append(sub)
                        prev = cut
                    continue
            if t in ("preproc_else", "ERROR"):
                walk([x for x in n.children if x.is_named], conds)
                continue
            it = _item(n, text(n), conds)
            if it is not None and not _KEYWORDS & set(it.names):  # a misparse names a keyword
                items.append(it)

    walk(tree.root_node.children, ())
    return items


def _item(n: Any, txt: str, conds: tuple[str, ...]) -> Item | None:
    t = n.type
    if t == "preproc_include":
        return Item("include", [], txt.rstrip(), n.start_byte, conds)
    if t in ("preproc_def", "preproc_function_def"):
        name = n.child_by_field_name("name").text.decode()
        return Item("macro", [name], txt.rstrip(), n.start_byte, conds, identifiers(n) - {name})
    if t == "function_definition":
        decl = n.child_by_field_name("declarator")
        name = _declared_name(decl)
        if name is None:
            return Item("other", [], txt, n.start_byte, conds)
        spec = _specifiers(n)
        body = n.child_by_field_name("body")
        head = txt[:body.start_byte - n.start_byte].strip()
        sig = identifiers(decl) | {x for c in n.children if c is not body and c is not decl for x in identifiers(c)}
        return Item("func", [name], txt, n.start_byte, conds, identifiers(n) - {name}, sig - {name},
                    static="static" in spec.split(), inline="inline" in spec, proto=head)
    m = _DEFINE.match(txt)
    if m:
        return Item("var", [m.group(3)], txt, n.start_byte, conds, identifiers(n), static=bool(m.group(1)),
                    proto=f"extern {DEFINE_TYPES[m.group(2)]} {m.group(3)};")
    if t == "declaration":
        decls = n.children_by_field_name("declarator")
        spec = _specifiers(n)
        names = [x for x in (_declared_name(d) for d in decls) if x]
        if decls and all(_is_function_declarator(d.child_by_field_name("declarator") or d)
                         if d.type == "init_declarator" else _is_function_declarator(d) for d in decls):
            return Item("proto", names, txt, n.start_byte, conds, identifiers(n))
        typ = n.child_by_field_name("type")
        type_names = _tag_names(typ)
        if not names:
            return Item("type", type_names, txt, n.start_byte, conds, identifiers(n) - set(type_names))
        ext = []
        for d in decls:
            core = d.child_by_field_name("declarator") if d.type == "init_declarator" else d
            val = d.child_by_field_name("value") if d.type == "init_declarator" else None
            ctext = text_of(core)
            arr = core
            while arr is not None and arr.type in ("pointer_declarator", "parenthesized_declarator"):
                arr = arr.child_by_field_name("declarator")
            if arr is not None and arr.type == "array_declarator" and arr.child_by_field_name("size") is None and \
                    val is not None and val.type == "initializer_list":  # keep ARRAY_SIZE() working
                n_elems = sum(1 for c in val.children if c.is_named and c.type != "comment")
                ctext = re.sub(r"\[\s*\]\s*$", f"[{n_elems}]", ctext)
            ext.append(ctext)
        quals = " ".join(q for q in spec.split() if q in ("const", "volatile"))
        tdecl = _type_decl_text(typ)
        proto = f"extern {quals + ' ' if quals else ''}{tdecl} {', '.join(ext)};"
        uses = identifiers(n) - set(names)
        return Item("var", names, txt, n.start_byte, conds, uses, identifiers(typ), static="static" in spec.split(),
                    const="const" in spec.split(), proto=proto)
    if t == "type_definition":
        names = [x for x in (_declared_name(d) for d in n.children_by_field_name("declarator")) if x]
        typ = n.child_by_field_name("type")
        names += _tag_names(typ)
        return Item("type", names, txt, n.start_byte, conds, identifiers(n) - set(names))
    if t in ("struct_specifier", "union_specifier", "enum_specifier"):
        names = _tag_names(n)
        return Item("type", names, txt + (";" if not txt.rstrip().endswith(";") else ""), n.start_byte, conds,
                    identifiers(n) - set(names))
    if t in ("comment", ";"):
        return None
    return Item("other", [], txt, n.start_byte, conds, identifiers(n))


def text_of(n: Any) -> str:
    return str(n.text.decode())


def _tag_names(typ: Any) -> list[str]:
    """``struct foo {...}`` defines the tag foo; ``enum {A, B}`` defines its enumerators."""
    if typ is None or typ.type not in ("struct_specifier", "union_specifier", "enum_specifier"):
        return []
    out = []
    body = typ.child_by_field_name("body")
    name = typ.child_by_field_name("name")
    if name is not None and body is not None:
        out.append(name.text.decode())
    if typ.type == "enum_specifier" and body is not None:
        out += [c.child_by_field_name("name").text.decode() for c in body.children if c.type == "enumerator"]
    return out


def _type_decl_text(typ: Any) -> str:
    """The type of a declaration without its body (``struct foo`` for ``struct foo {...}``)."""
    if typ is not None and typ.type in ("struct_specifier", "union_specifier", "enum_specifier"):
        name = typ.child_by_field_name("name")
        kw = typ.type.split("_")[0]
        return f"{kw} {name.text.decode()}" if name is not None else text_of(typ)
    return text_of(typ) if typ is not None else "int"


_MACRO_CALL = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*\(\s*(\w+)")


def _made_by(items: list[Item], name: str) -> str | None:
    """The macro invocation of the file that defines ``name`` (``SYSCALL_DEFINE1(newuname, ...)`` makes
    ``__x64_sys_newuname``, ``__se_sys_newuname`` and ``__do_sys_newuname``, 6.1
    arch/x86/include/asm/syscall_wrapper.h), as ``MACRO(first, ...)``; None when no invocation's first
    argument ends the name."""
    for it in items:
        m = _MACRO_CALL.match(it.text)
        if m and it.kind != "macro" and (name == m.group(2) or name.endswith("_" + m.group(2))):
            return f"{m.group(1)}({m.group(2)}, ...)"
    return None


@dataclass
class Closure:
    """The items to emit, in source order, and for each why (``copy``, ``declare``, ``replace``)."""

    items: list[tuple[Item, str, str]] = field(default_factory=list)  # (item, mode, comment)


def closure(items: list[Item], replace: dict[str, str], has_symbol: Callable[[str], bool], file: str,
            copies: dict[str, str] | None = None, inlined: dict[str, str] | None = None) -> Closure:
    """The closure of the functions ``replace`` (name -> why) among ``items``.

    ``has_symbol(name)``: the running kernel has a symbol of that name for this file. ``copies`` (name ->
    why): functions copied whatever the symbols say (a function the running kernel has only as a GCC clone:
    :mod:`klpforge.source.clones`); each must have a C definition. ``inlined`` (name -> the function
    GCC inlined it into in the running kernel, from the ipa-clones dump): such a function of the file is
    copied even when it has a symbol too (a global, or a static called elsewhere), so that the module
    inlines it again: a call to the running kernel's copy would be other code than the binary diff's.
    Raises
    :class:`UnsafeChange` when a needed variable cannot be referenced (no symbol, not const) or a function to
    replace is not defined in the file."""
    defs: dict[str, list[Item]] = {}
    for it in items:
        if it.kind in ("macro", "type", "var", "func"):
            for n in it.names:
                defs.setdefault(n, []).append(it)
    protos: dict[str, list[Item]] = {}
    for it in items:
        if it.kind == "proto":
            for n in it.names:
                protos.setdefault(n, []).append(it)
    mode: dict[int, tuple[Item, str, str]] = {}
    todo: list[str] = []
    for name, why in replace.items():
        fs = [it for it in defs.get(name, []) if it.kind == "func"]
        if not fs:
            made = _made_by(items, name)
            if made:
                raise UnsafeChange(f"{file}: {name} (replaced: {why}) is made by the macro {made} in {file}: "
                                   "extract writes C function definitions by name, and which of the functions the "
                                   "macro expands to the kernel calls (and with which ABI) is the macro's, not "
                                   "visible in the source; make this live patch with klpforge build")
            raise UnsafeChange(f"{file}: {name} (replaced: {why}) has no C function definition in {file} "
                               "(defined by a macro?): its source cannot be extracted")
        for it in fs:
            mode[id(it)] = (it, "replace", why)
            todo.extend(it.uses)
    for name, why in (copies or {}).items():
        fs = [it for it in defs.get(name, []) if it.kind == "func"]
        if not fs:
            raise UnsafeChange(f"{file}: {name} ({why.split(':')[0]}) has no C function definition in {file} "
                               "(defined by a macro?): its source cannot be extracted")
        for it in fs:
            if id(it) not in mode:
                mode[id(it)] = (it, "copy", why)
                todo.extend(it.uses)
    for it in items:
        if it.kind == "macro" and it.names[0] in HEADER_CONFIG:
            mode[id(it)] = (it, "copy", "")
            todo.extend(it.uses)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in defs:  # declared in the file, defined elsewhere (another object, a new global)
            for it in protos.get(name, []):
                mode[id(it)] = (it, "copy", "")
                todo.extend(it.uses)
        for it in defs.get(name, []):
            if id(it) in mode and mode[id(it)][1] != "declare":
                continue
            if it.kind in ("macro", "type"):
                mode[id(it)] = (it, "copy", "")
                todo.extend(it.uses)
            elif it.kind == "func":
                into = (inlined or {}).get(name)
                if it.inline or not has_symbol(name) or into:
                    why = "static inline" if it.inline else \
                        f"no symbol {name} in the running kernel (inlined, or new with the patch)" \
                        if not has_symbol(name) else \
                        f"GCC inlined {name} into {into} in the running kernel: copied so that it is inlined again"
                    mode[id(it)] = (it, "copy", why)
                    todo.extend(it.uses)
                else:
                    mode[id(it)] = (it, "declare", "")
                    todo.extend(it.sig_uses)
            elif it.kind == "var":
                if has_symbol(name):
                    mode[id(it)] = (it, "declare", "")
                    todo.extend(it.sig_uses)
                elif it.const:
                    mode[id(it)] = (it, "copy", f"const, folded by the compiler (no symbol {name})")
                    todo.extend(it.uses)
                else:  # compiled out in this configuration, or the code using it is; convert refuses otherwise
                    mode[id(it)] = (it, "declare", f"no symbol {name} in the running kernel: a reference to it "
                                    "must compile away (else convert refuses)")
                    todo.extend(it.sig_uses)
    for it in items:  # every #include (the headers are the kernel's; a reviewer skips them)
        if it.kind == "include":
            mode[id(it)] = (it, "copy", "")

    for it in items:  # forward declarations keep the file's order valid
        if it.kind == "proto" and it.names and all(n in seen or n in replace for n in it.names):
            modes = {mode[id(d)][1] for n in it.names for d in defs.get(n, []) if id(d) in mode}
            if modes:
                mode[id(it)] = (it, "declare" if modes == {"declare"} else "copy", "")
    return Closure(sorted(mode.values(), key=lambda m: m[0].start))
