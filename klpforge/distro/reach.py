"""Header changes: which objects of a release a change to a ``static inline`` function reaches, without a
full build.

A real fix often edits a ``static inline`` in a header; its code then lives in every object that calls it
(directly, or through another inline of a header that calls it). Without a full build the prepared tree has
no dependency lists, so the set is found in two steps:

1. *candidates*: the functions the header hunks touch (tree-sitter-c on the pristine header,
   :func:`klpforge.ipa.patchmap.functions_in_source`), widened to the inline functions of headers that call
   them (a few rounds), then every ``.c`` file of the tree naming one of them (``grep -w``, x86 only);
2. *proof*: the candidates are compiled by Kbuild (single targets, ``make -k``: a file the shipped config
   does not build has no rule and drops out), and an object is kept only if the dependency list Kbuild's
   ``fixdep`` wrote into its ``.cmd`` file (the preprocessor's ``-MMD`` output) names the header. The diff
   then drops the objects whose code did not change.

A changed file that is not a header may be ``#include``d too: ``fs/compat_binfmt_elf.c`` includes
``fs/binfmt_elf.c``, ``kernel/sched/build_utility.c`` includes ``completion.c``, and such a translation
unit has its own copy of every function. Those files (``.c``, ``.inc``, anything not a header) are followed
the same way: *candidates* are the ``.c`` files whose ``#include`` line names the file, *proof* is the
``.cmd`` dependency list; an include found only in a header, or a non-``.c`` file no ``.c`` includes by
name, is refused with the reason (its reach cannot be known without a full build).

A hunk outside any function body (a macro, a type, a declaration) reaches objects no name search can find:
that change is refused with the reason unless the patch also names the ``.c`` files to rebuild.

>>> _names_pattern(["a", "b_c"])
'\\\\b(a|b_c)\\\\b'
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ..kbuild.patchfile import C_INCLUDED, SourcePatch, unknown_reach
from ..util.errors import InputError
from .base import DistroTree, Say

__all__ = ["header_changes", "candidate_objects", "objects_including", "MAX_CANDIDATES", "included_files",
           "includer_candidates"]

#: More candidate files than this and the change is refused (a widely used inline: rebuilding hundreds of
#: objects is a full build in disguise); the message names the functions.
MAX_CANDIDATES = 150

_SKIP_DIRS = ("tools/", "samples/", "scripts/", "Documentation/", "usr/", "arch/")


def _names_pattern(names: list[str]) -> str:
    return r"\b(" + "|".join(sorted(set(names))) + r")\b"


def header_changes(patches: list[SourcePatch], src: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``({header: [functions its hunks touch]}, [headers with hunks outside function bodies])``."""
    from ..ipa.patchmap import _hunk_lines, functions_in_source
    from ..util.unidiff import read_patch

    funcs: dict[str, list[str]] = {}
    outside: list[str] = []
    for p in patches:
        for f in read_patch(p.path, 1):
            if f.old is None or not f.old.endswith(".h"):
                continue
            hdr = src / f.old
            if not hdr.is_file():
                raise InputError(f"{f.old}: not a file of the release's source")
            text = hdr.read_bytes()
            lines = _hunk_lines(p.path, f.old, f.hunks, hdr)
            per_line = {ln: functions_in_source(text, {ln}) for ln in sorted(lines)}
            got = sorted({n for v in per_line.values() for n in v})
            funcs.setdefault(f.old, [])
            funcs[f.old] = sorted(set(funcs[f.old]) | set(got))
            if any(not v for v in per_line.values()):
                outside.append(f.old)
    return funcs, sorted(set(outside))


def _grep(src: Path, pattern: str, dirs: list[str], include: str) -> list[str]:
    r = subprocess.run(["grep", "-rlE", f"--include={include}", pattern, *dirs], cwd=src, capture_output=True,
                       text=True, check=False)
    return sorted(r.stdout.split())


def candidate_objects(tree: DistroTree, funcs: dict[str, list[str]], say: Say | None = None) -> list[str]:
    """Objects whose source names a changed inline function or an inline (of any header) that calls one.

    Raises :class:`InputError` when more than :data:`MAX_CANDIDATES` files name them.
    """
    from ..ipa.patchmap import _name_of, _parser

    names = {n for v in funcs.values() for n in v}
    if not names:
        return []
    hdr_dirs = [d for d in ("include", "arch/x86/include") if (tree.src / d).is_dir()]
    hdr_dirs += sorted({str(Path(h).parent) for h in funcs} - set(hdr_dirs))
    parser = _parser()
    for _round in range(4):  # inline callers of inline callers ...
        grown = set(names)
        for h in _grep(tree.src, _names_pattern(sorted(names)), hdr_dirs, "*.h"):
            root = parser.parse((tree.src / h).read_bytes()).root_node
            stack = [root]
            while stack:
                node = stack.pop()
                if node.type == "function_definition":
                    name = _name_of(node.child_by_field_name("declarator"))
                    body = node.child_by_field_name("body")
                    if name and body is not None and re.search(_names_pattern(sorted(names)),
                                                               body.text.decode(errors="replace")):
                        grown.add(name)
                    continue
                stack.extend(node.children)
        if grown == names:
            break
        names = grown
    dirs = [d.name for d in tree.src.iterdir() if d.is_dir() and d.name + "/" not in _SKIP_DIRS]
    files = _grep(tree.src, _names_pattern(sorted(names)), sorted(dirs) + ["arch/x86"], "*.c")
    if say:
        say(f"header change: {len(files)} source file(s) name {len(names)} affected inline function(s)")
    if len(files) > MAX_CANDIDATES:
        shown = ", ".join(sorted(n for v in funcs.values() for n in v))
        raise InputError(f"the header change to {shown} reaches {len(files)} source files (more than "
                         f"{MAX_CANDIDATES}): too many objects to rebuild without a full build; give the .c "
                         "files to rebuild in the patch")
    return [f[:-2] + ".o" for f in files]


def objects_including(tree: DistroTree, objs: list[str], headers: list[str]) -> list[str]:
    """Those of ``objs`` (compiled in ``tree.build``) whose ``.cmd`` dependency list names one of ``headers``
    (tree-relative; any included file, not only ``.h``), as
    :func:`klpforge.kbuild.tree.cmd_dependencies` reads it (``deps_<obj> := ... $(srctree)/include/linux/x.h
    \\``, written by Kbuild's fixdep from ``-MMD``)."""
    from ..kbuild.tree import cmd_dependencies

    want = {os.path.normpath(h) for h in headers}
    keep: list[str] = []
    for o in objs:
        cmd = tree.build / Path(o).parent / f".{Path(o).name}.cmd"
        try:
            text = cmd.read_text(errors="replace")
        except OSError:
            continue
        if want & cmd_dependencies(text, tree.src, tree.build):
            keep.append(o)
    return keep


def included_files(patches: list[SourcePatch]) -> list[str]:
    """The changed files other translation units may ``#include`` and that the header reach
    (:func:`header_changes`) does not follow: every file but headers, documentation and the build system
    (``.c`` files too: ``fs/compat_binfmt_elf.c`` includes ``fs/binfmt_elf.c``)."""
    out: list[str] = []
    for p in patches:
        for f in p.files:
            base = f.rsplit("/", 1)[-1]
            if (f.endswith(".h") or f in p.created or base.startswith(("Makefile", "Kconfig", "Kbuild"))
                    or (not f.endswith(C_INCLUDED) and unknown_reach(f) is None)):
                continue  # headers: header_changes; documentation, README: no code
            out.append(f)
    return list(dict.fromkeys(out))


_INCLUDE = re.compile(r'^\s*#\s*include\s*(["<])([^">]+)[">]', re.M)


def _may_include(src: Path, c: str, f: str) -> bool:
    """Whether ``c`` (tree-relative) may include ``f``: a quoted ``#include`` naming ``f``'s base name that
    resolves next to ``c`` to ``f`` itself, or to no file there (then the ``-I`` paths decide: kept, the
    ``.cmd`` proof settles it). A quoted include resolving next to ``c`` to another file is that file
    (gcc searches the includer's directory first), as ``arch/x86/boot/compressed/cmdline.c``'s
    ``"../cmdline.c"`` is not ``fs/proc/cmdline.c``."""
    name = Path(f).name
    try:
        text = (src / c).read_text(errors="replace")
    except OSError:
        return False
    for m in _INCLUDE.finditer(text):
        kind, inc = m.groups()
        if Path(inc).name != name:
            continue
        here = os.path.normpath(os.path.join(os.path.dirname(c), inc))
        if kind == "<" or here == os.path.normpath(f) or not (src / here).is_file():
            return True
    return False


def includer_candidates(tree: DistroTree, files: list[str]) -> dict[str, list[str]]:
    """``{file: [objects of the .c files whose #include line names file's base name]}`` (``grep``; x86
    only). A file of ``files`` that is not ``.c`` and that no ``.c`` file includes by name, or that a header
    includes, is refused (:class:`InputError` with the reason): which objects it reaches cannot be known
    without a full build."""
    dirs = [d.name for d in tree.src.iterdir() if d.is_dir() and d.name + "/" not in _SKIP_DIRS]
    out: dict[str, list[str]] = {}
    for f in files:
        pat = r'^\s*#\s*include\s*["<]([^">]*/)?' + re.escape(Path(f).name) + '[">]'
        hdrs = _grep(tree.src, pat, sorted(dirs) + ["arch/x86"], "*.h")
        if hdrs:
            raise InputError(f"{f}: {hdrs[0]} #includes it: which objects a file included through a header "
                             "reaches cannot be known without a full build; add the .c files to rebuild to the patch")
        srcs = [c for c in _grep(tree.src, pat, sorted(dirs) + ["arch/x86"], "*.c")
                if c != f and _may_include(tree.src, c, f)]
        if not srcs and not f.endswith(".c"):
            raise InputError(f"{f}: not C source and no .c file #includes it by name: which objects it reaches "
                             "cannot be known without a full build")
        out[f] = [c[:-2] + ".o" for c in srcs]
    return out
