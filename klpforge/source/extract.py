"""``klpforge extract``: a live patch as C sources a person can review, the function set proved by the binary diff.

1. The binary diff runs as ``klpforge build`` runs it (:func:`klpforge.kbuild.pipeline.build_livepatch`):
   it says, per changed object, which functions the running kernel must have replaced and why (a changed
   function, a caller of an inlined one ...). Its module is kept as ``binary-diff.ko`` for the cross-check
   of ``build --from-source``.
2. Per changed object ``DIR/<path>.c`` (``fs/proc/meminfo.o`` -> ``fs_proc_meminfo.c``): the closure
   (:mod:`klpforge.source.closure`) of those functions in the patched source, the functions with their
   source text; references to the running kernel's non-exported symbols keep their names (``convert``
   resolves them), with a ``KLP_SYMPOS`` marker where the name is not unique.
3. ``DIR/klp_patch.c``: the ``klp_patch`` (:func:`klpforge.kbuild.module.module_source`), ``DIR/Kbuild``,
   ``DIR/klpforge_sympos.h`` and ``DIR/klpforge-extract.json`` (the binary diff's functions, for the
   cross-check).

Refused (exit 2), naming what and why: a function the diff replaces as a compiler clone (``.isra``,
``.constprop``, ``.part``: its callers pass another ABI), callbacks, a file-scope variable without a symbol
in the running kernel.

>>> extract(Path("linux"), Path("build"), Path("fix.patch"), Path("livepatch-fix"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.symtab import TargetSymtab
from ..kbuild.module import KlpFunc, KlpTarget, module_source, sanitize_module_name
from ..kbuild.patchfile import SourcePatch
from ..kbuild.pipeline import BuildOptions, BuildResult, build_livepatch, data_include_dir
from ..kbuild.tree import KernelTree
from ..util.errors import InputError, UnsafeChange
from ..util.proc import run
from .clones import ClonePlan, clone_plan, dump_of, inlined_into, is_abi_clone
from .closure import Closure, closure, parse_items

__all__ = ["extract", "ExtractResult", "render", "CLONE", "unit_name", "new_symbol"]

#: GCC's clone suffixes (``foo.isra.0``, ``foo.constprop.0.isra.0``, ``foo.part.0``, ``foo.cold``)
CLONE = re.compile(r"\.(isra|constprop|part|cold|lto_priv|localalias)(\.\d+)?")
MANIFEST = "klpforge-extract.json"


@dataclass
class ExtractResult:
    """Files written, per source file its line count, and the binary diff's functions per object."""

    files: list[Path] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    functions: dict[str, list[str]] = field(default_factory=dict)
    #: per object: each clone the binary diff replaces -> the callers the source replaces instead
    clones: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def unit_name(obj: str) -> str:
    """``fs/proc/meminfo.o`` -> ``fs_proc_meminfo`` (the extracted file's stem, a C identifier part)."""
    return re.sub(r"\W", "_", obj.removesuffix(".o"))


def new_symbol(unit: str, func: str) -> str:
    """The global alias the ``klp_func`` entry names for the new ``func`` of ``unit``."""
    return f"klpforge_new__{unit}__{func}"


def _declaration(head: str) -> str:
    """A function's head as a declaration of the running kernel's function: no storage class, no
    ``weak`` (a weak undefined reference would silently be 0)."""
    head = re.sub(r"\b(static|inline|__always_inline|noinline|__init|__cold|__weak)\b\s*", "", head)
    return re.sub(r"__attribute__\s*\(\(\s*(__)?weak(__)?\s*\)\)\s*", "", head).strip()


def render(rel: str, patch_name: str, cl: Closure, target: str, unit: str, sympos: dict[str, int],
           replaced: dict[str, str], carried: dict[str, str] | None = None,
           callbacks: dict[str, str] | None = None) -> str:
    """The C file of one object: header comment, the closure in source order, the aliases of the new
    functions and of the callbacks (``callbacks``: kind -> function)."""
    out = ["// SPDX-License-Identifier: GPL-2.0",
           f"/*\n * Live patch source for {rel} ({target}), extracted by klpforge from {patch_name}.",
           " * Replaced (the binary diff's set):"]
    out += [f" *   {n}: {why}" for n, why in replaced.items()]
    out += [" * Static functions not replaced are declared, not copied; file-scope variables are the running",
            " * kernel's (extern). `klpforge convert` turns both into klp relocations.", " */"]
    if target == "vmlinux":  # compiled as the built-in object was: headers' #ifndef MODULE parts, its pr_fmt
        base = Path(rel).stem
        out += ["#undef MODULE", "#undef KBUILD_MODNAME", f'#define KBUILD_MODNAME "{base}"']
    marks = [f"KLP_SYMPOS({target}, {n}, {p});" for n, p in sorted(sympos.items()) if p > 0]
    placed_marks = False
    for it, mode, why in cl.items:
        if it.kind != "include" and not placed_marks:
            if marks:
                out += ["", '#include "klpforge_sympos.h"', *marks]
            placed_marks = True
        if it.kind == "include":
            body = it.text
        elif mode == "declare" and it.kind == "func":
            body = _declaration(it.proto) + ";"
        elif mode == "declare" and it.kind == "proto":
            body = _declaration(it.text)
        elif mode == "declare":
            body = it.proto
        else:
            body = it.text.rstrip()
        if mode == "replace" and it.names and it.names[0] in (carried or {}):
            body = f"/* klpforge: {why} */\n{body}"
        elif mode == "replace":
            body = f"/* klpforge: replaced: {why} */\n{body}"
        elif mode == "declare" and why:
            body = f"/* klpforge: {why} */\n{body}"
        elif why:
            body = f"/* klpforge: copied: {why} */\n{body}"
        if it.conds:
            body = "\n".join(it.conds) + "\n" + body + "\n" + "#endif\n" * len(it.conds)
        sep = "" if it.kind == "include" else "\n"
        out.append(sep + body.rstrip())
    if not placed_marks and marks:
        out += ['#include "klpforge_sympos.h"', *marks]
    out.append("\n/* klpforge: the klp_func entries of klp_patch.c name these */")
    for n in [*replaced, *(callbacks or {}).values()]:
        out.append(f"extern typeof({n}) {new_symbol(unit, n)} __attribute__((__alias__(\"{n}\")));")
    return "\n".join(out) + "\n"


def extract(src: Path, build: Path | None, patch: Path, outdir: Path, jobs: int = 1,
            progress: Callable[[str, str], None] | None = None) -> ExtractResult:
    """Run the binary diff, then write ``outdir`` (created; must not exist or be empty). Raises InputError,
    UnsafeChange (a closure that cannot be extracted) or NoChange (from the diff)."""
    if outdir.exists() and any(outdir.iterdir()):
        raise InputError(f"-o {outdir}: exists and is not empty")
    stem = patch.name.removesuffix(".patch").removesuffix(".diff")
    modname = sanitize_module_name(f"livepatch-{stem}")
    work = Path(tempfile.mkdtemp(prefix="klpforge-extract-"))
    stage = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent.resolve()))
    try:
        res = build_livepatch(BuildOptions(src=src, patch=patch, build=build, output=work / "binary-diff.ko",
                                           jobs=jobs, keep_tmp=True, extra_cflags="-fdump-ipa-clones"),
                              progress)
        try:
            out = _write(res, src, build, patch, modname, stage)
            shutil.copyfile(work / "binary-diff.ko", stage / "binary-diff.ko")
            out.files.append(stage / "binary-diff.ko")
        finally:
            if res.tmpdir:
                shutil.rmtree(res.tmpdir, ignore_errors=True)
        if outdir.exists():
            outdir.rmdir()
        stage.rename(outdir)
        out.files = [outdir / f.relative_to(stage) for f in out.files]
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


#: kpatch-macros.h's callback macros (klpforge/data/kpatch-macros.h, kpatch's kpatch-macros.h) -> klp kind
_CALLBACK = re.compile(r"^\s*KPATCH_(PRE_PATCH|POST_PATCH|PRE_UNPATCH|POST_UNPATCH)_CALLBACK\s*\(\s*(\w+)\s*\)", re.M)


def _callbacks(text: str) -> dict[str, str]:
    """The patched file's callbacks: kind (``pre_patch`` ...) -> the C function the macro names."""
    return {m.group(1).lower(): m.group(2) for m in _CALLBACK.finditer(text)}


def _write(res: BuildResult, src: Path, build: Path | None, patch: Path, modname: str, stage: Path
           ) -> ExtractResult:
    tree = KernelTree(src, build)
    out = ExtractResult()
    targets: dict[str, KlpTarget] = {}
    units: list[str] = []
    notes: dict[str, list[str]] = {}
    cbs_of: dict[str, dict[str, str]] = {}
    sources: dict[str, list[dict[str, object]]] = {}
    kbuild_flags: list[str] = []
    for o in res.outcomes:
        rel = o.obj.removesuffix(".o") + ".c"
        path = (res.tmpdir / "src" / "new" / rel) if res.tmpdir else None
        if path is None or not path.is_file():
            path = tree.src / rel
        if not path.is_file():
            raise UnsafeChange(f"{o.obj}: no C source {rel}: its source cannot be extracted")
        replaced: dict[str, str] = {}
        sympos_of: dict[str, int] = {}
        clones: list[str] = []
        for f in o.funcs:
            if is_abi_clone(f.old_name):
                clones.append(f.old_name)
                continue
            base = CLONE.split(f.old_name, 1)[0]
            if base != f.old_name:
                raise UnsafeChange(f"{o.obj}: the binary diff replaces {f.old_name}, a compiler-made piece of {base} "
                                   "that has no C definition of its own: extract cannot write it (use klpforge build)")
            replaced[f.old_name] = f.reason or "changed by the patch"
            sympos_of[f.old_name] = f.sympos
        par = tree.parent_of(o.obj)
        st = TargetSymtab.load(par.binary, is_module=par.target != "vmlinux")
        items = parse_items(path.read_bytes())
        fname = Path(rel).name
        unit = unit_name(o.obj)
        plan = ClonePlan()
        if clones:  # replaced through their callers (klpforge.source.clones)
            if res.tmpdir is None:
                raise UnsafeChange(f"{o.obj}: no original object to find the callers of {', '.join(clones)} in")
            plan = clone_plan(res.tmpdir / "orig" / o.obj, rel, clones, set(replaced),
                              (f"{res.tmpdir / 'src' / 'view'}/", f"{res.tmpdir / 'orig'}/"))
            static = {n: it.static for it in items if it.kind == "func" for n in it.names}
            for n, why in plan.callers.items():
                replaced[n] = why
                try:
                    sympos_of[n] = st.sympos(n, fname, local=static.get(n, True))
                except InputError as e:
                    raise UnsafeChange(f"{o.obj}: {n} (a caller of {plan.clones and next(iter(plan.clones))}): "
                                       f"{e}") from None
            ref = stage / "reference" / f"{unit}.o"  # the patched object: what the callers compile to
            ref.parent.mkdir(exist_ok=True)
            r = run(["objcopy", "--strip-debug", str(res.tmpdir / "patched" / o.obj), str(ref)],
                    capture_output=True, text=True)
            if r.returncode != 0:
                raise InputError(f"objcopy --strip-debug {o.obj}: {r.stderr.strip()[:300]}")
            out.files.append(ref)
        # functions the diff carries without replacing anything (new with the patch): copied, no klp_func
        carried = {n: f"carried by the binary diff: {why}" for n, why in o.carried.items()
                   if CLONE.split(n, 1)[0] == n and n not in replaced}
        # the patch's callbacks (kpatch-macros.h): copied, named by the klp_object's callbacks
        callbacks = _callbacks(path.read_text(errors="replace"))
        if set(callbacks) != set(o.callbacks):
            raise UnsafeChange(f"{o.obj}: the binary diff found callbacks {', '.join(sorted(o.callbacks)) or 'none'}, "
                               f"the source's KPATCH_*_CALLBACK lines name {', '.join(sorted(callbacks)) or 'none'}")
        for kind, fn in callbacks.items():
            carried[fn] = f"the patch's {kind} callback (klp_object.callbacks of {par.target})"
        # what GCC inlined into the functions written out (and into the clones they stand for): copied
        inl = inlined_into(dump_of(res.tmpdir / "orig" / o.obj), {*replaced, *carried, *plan.clones}) \
            if res.tmpdir else {}
        cl = closure(items, {**replaced, **carried}, st.has, rel, plan.copies, inl)
        refs: dict[str, int] = {}
        for it, mode, _why in cl.items:
            if mode == "declare" and it.kind in ("func", "var"):
                for n in it.names:
                    try:
                        refs[n] = st.sympos(n, fname, local=it.static)
                    except InputError:
                        refs[n] = 0  # convert names the candidates
        text = render(rel, patch.name, cl, par.target, unit, refs, replaced, carried, callbacks)
        (stage / f"{unit}.c").write_text(text)
        out.files.append(stage / f"{unit}.c")
        out.lines[f"{unit}.c"] = text.count("\n")
        out.functions[o.obj] = [f.old_name for f in o.funcs]
        out.clones[o.obj] = plan.clones
        cbs_of[o.obj] = callbacks
        notes[o.obj] = plan.notes
        sources[o.obj] = [{"old_name": n, "sympos": sympos_of[n], "reason": why,
                           "compare": "reference" if n in plan.callers else "binary-diff"}
                          for n, why in replaced.items()]
        units.append(unit)
        kbuild_flags.append(f"CFLAGS_{unit}.o += -I$(srctree)/{Path(rel).parent}")
        if not replaced and not callbacks:
            continue
        t = targets.setdefault(par.target, KlpTarget(par.target))
        t.funcs += [KlpFunc(n, sympos_of[n], new_symbol(unit, n), why) for n, why in replaced.items()]
        for kind, fn in callbacks.items():
            if kind in t.callbacks:
                raise UnsafeChange(f"{o.obj}: a second {kind} callback for {par.target} ({fn}): a klp_object has one")
            t.callbacks[kind] = new_symbol(unit, fn)
    (stage / "klp_patch.c").write_text(module_source(modname, list(targets.values())))
    # headers the patch changes: their patched text, found before the tree's (NOSTDINC_FLAGS comes first
    # on Kbuild's command line, 6.1 scripts/Makefile.lib c_flags)
    hdirs: list[str] = []
    for rel in SourcePatch.parse(patch).files:
        new = res.tmpdir / "src" / "new" / rel if res.tmpdir else None
        if not rel.endswith(".h") or new is None or not new.is_file():
            continue
        (stage / "patched" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(new, stage / "patched" / rel)
        m = re.match(r"^((?:arch/[^/]+/)?include)/", rel)
        d = m.group(1) if m else str(Path(rel).parent)
        if d not in hdirs:
            hdirs.append(d)
    (stage / "Kbuild").write_text(
        f"# Built by `klpforge build --from-source DIR`: make -C BUILD M=DIR KBUILD_MODPOST_WARN=1, then convert\n"
        f"obj-m := {modname}.o\n{modname}-y := klp_patch.o {' '.join(u + '.o' for u in units)}\n"
        "# a section per function and object, as the binary diff compiled them: calls stay relocations\n"
        "ccflags-y += -I$(src) -ffunction-sections -fdata-sections\n" + "\n".join(kbuild_flags) + "\n"
        + "".join(f"NOSTDINC_FLAGS += -I$(src)/patched/{d}\n" for d in hdirs))
    shutil.copyfile(data_include_dir() / "klpforge_sympos.h", stage / "klpforge_sympos.h")
    if any(cbs_of.values()):  # the patch's #include "kpatch-macros.h" and what it includes
        for h in ("kpatch-macros.h", "kpatch-syscall.h", "kpatch.h"):
            shutil.copyfile(data_include_dir() / h, stage / h)
            out.files.append(stage / h)
    (stage / MANIFEST).write_text(json.dumps({
        "patch": str(patch), "module": modname,
        "objects": [{"object": o.obj, "target": o.target, "unit": unit_name(o.obj),
                     "functions": [{"old_name": f.old_name, "sympos": f.sympos, "reason": f.reason,
                                   "new_symbol": f.new_symbol} for f in o.funcs],
                     # what the C source replaces (klp_funcs): the binary diff's functions, a clone's callers
                     "source_functions": sources.get(o.obj, []),
                     "clones": out.clones.get(o.obj, {}), "notes": notes.get(o.obj, []),
                     "callbacks": [{"kind": k, "function": fn, "binary_symbol": o.callbacks[k]}
                                   for k, fn in cbs_of.get(o.obj, {}).items()],
                     **({"reference": f"reference/{unit_name(o.obj)}.o"} if out.clones.get(o.obj) else {})}
                    for o in res.outcomes]}, indent=1) + "\n")
    out.files += [stage / n for n in ("klp_patch.c", "Kbuild", "klpforge_sympos.h", MANIFEST)]
    return out
