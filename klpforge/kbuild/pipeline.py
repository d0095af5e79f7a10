"""``klpforge build``: from a built kernel tree and a source patch to a livepatch ``.ko``.

Steps (each timed, see :attr:`BuildResult.timings`):

1. *check*: tree built, ``CONFIG_LIVEPATCH``, gcc on PATH == compiler in vmlinux ``.comment``, the patch
   touches no ``.S``/``lib/`` file, every changed object was compiled from ``-s``; each changed object's
   parent; the touched files are copied to a private directory and the patch is applied there
   (:class:`~klpforge.kbuild.overlay.Overlay`).
2. *orig*: recompile each changed object with its recorded Kbuild command plus
   ``-ffunction-sections -fdata-sections``, reading the tree through the overlay's view with the original
   copies in place; every output in a temp dir.
3. *patched*: the same with the patched copies in place. The user's source and build trees are only read.
4. *diff*: :mod:`klpforge.diff` per object, with the parent's symbol table and ``Module.symvers``.
5. *module*: generate the ``klp_patch`` source, link with Kbuild (``make -C BUILD M=tmp modules``).
6. *postlink*: put the klp relocations back into the ``.ko`` (``klpforge.diff.emit.postlink``), with sympos
   from the linked vmlinux, and write the output atomically.

>>> res = build_livepatch(BuildOptions(src=Path("linux"), patch=Path("fix.patch")))   # doctest: +SKIP
>>> res.output                                                                        # doctest: +SKIP
PosixPath('livepatch-fix.ko')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

from ..util import provenance
from ..util.buildlog import BuildLog
from ..util.errors import InputError, KlpError, NoChange, UnsafeChange
from ..util.fsutil import atomic_write
from ..util.proc import kill_children, run, signals_held
from .clang import RootRunner, Toolchain, cc_version_text, check_supported, clang_root_for, root_binds, tools_in_root
from .diffstep import DiffOutcome, postlink_api, run_object_diff
from .kcfi import check_kcfi
from .module import KlpTarget, ModuleExport, build_module, sanitize_module_name
from .newsyms import patch_exports, patch_globals
from .overlay import Overlay, reads_from_tree, rewrite_command
from .patchfile import SourcePatch, unknown_reach
from .restore import check_old_journal
from .structsizes import struct_sizes
from .thinlto import backend, index_objects, relink_index, stable_llvm_names
from .tree import KernelTree, Parent

__all__ = ["BuildOptions", "BuildResult", "build_livepatch", "STEPS", "SUBSTEPS", "data_include_dir"]

#: Step names in order, for progress bars and the bench.
STEPS = ("check", "orig", "patched", "diff", "module", "postlink")
#: Steps some trees add, shown as the step they belong to (distributed ThinLTO: the index link and backends).
SUBSTEPS = {"lto": "patched"}

SECTION_FLAGS = "-ffunction-sections -fdata-sections"


def data_include_dir() -> Path:
    """Directory holding ``kpatch-macros.h`` (added with ``-I`` to both compiles)."""
    return Path(str(resources.files("klpforge") / "data"))


@dataclass
class BuildOptions:
    """Inputs of one build."""

    src: Path
    patch: Path
    build: Path | None = None
    output: Path | None = None
    jobs: int = os.cpu_count() or 1
    replace: bool = True
    keep_tmp: bool = False
    skip_compiler_check: bool = False
    report_json: Path | None = None
    #: added to both compiles (extract: ``-fdump-ipa-clones``, which changes no code, for the impact analysis)
    extra_cflags: str = ""


@dataclass
class BuildResult:
    """Outcome: the module written, what went in, how long each step took."""

    output: Path
    module_name: str
    outcomes: list[DiffOutcome]
    unchanged: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    tmpdir: Path | None = None
    #: symbols the patch adds with EXPORT_SYMBOL*, exported by the live patch module
    exports: list[ModuleExport] = field(default_factory=list)
    #: what went in (klpforge.util.provenance.record), also in the module's .modinfo
    provenance: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-able report: functions per target with sympos and reason, step timings."""
        return {
            "output": str(self.output),
            "module": self.module_name,
            "objects": [
                {"object": o.obj, "target": o.target,
                 "functions": [{"old_name": f.old_name, "sympos": f.sympos, "new_symbol": f.new_symbol,
                                "reason": f.reason} for f in o.funcs],
                 "callbacks": o.callback_sources, "carried_functions": o.carried,
                 "diff_report": o.report}
                for o in self.outcomes],
            "unchanged_objects": self.unchanged,
            "exports": [{"name": e.name, "gpl": e.gpl, "namespace": e.namespace} for e in self.exports],
            "provenance": self.provenance,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


ProgressFn = Callable[[str, str], None]


def _changed_objects(tree: KernelTree, patch: SourcePatch) -> tuple[list[str], list[str]]:
    """Objects to rebuild for ``patch`` and notes on files that affect none: for each changed file every
    object whose recorded dependencies name it (:meth:`KernelTree.objects_including`), so a ``.c`` file
    another ``.c`` file includes rebuilds both objects; a ``.c`` file no object records maps to its own
    object name (refused later as not built)."""
    objs: list[str] = []
    notes: list[str] = []
    for old, new in (*patch.renamed, *patch.copied):
        if old.endswith((".c", ".h")) or new.endswith((".c", ".h")):
            raise InputError(f"{old} -> {new}: the patch renames or copies a source file; a live patch can "
                             "only change existing objects in place")
    for f in patch.deleted:
        if f.endswith((".c", ".h")):
            raise InputError(f"{f}: the patch deletes a source file; a live patch can only change existing "
                             "objects in place")
    for f in patch.files:
        if f in patch.created and f.endswith((".c", ".h")):
            raise InputError(f"{f}: the patch creates a source file; a live patch can only change "
                             "existing objects (put new code in an existing file)")
        # every object whose translation unit reads f: a .c file's own object, and those of the .c files
        # that #include it (fs/compat_binfmt_elf.c includes fs/binfmt_elf.c; kernel/sched/build_utility.c
        # includes completion.c), as fixdep recorded them; headers, .inc and any other included file alike
        users = tree.objects_including(f)
        if f.endswith(".c") and not users:
            objs.append(tree.object_for_source(f))
        elif not users and f not in patch.created and (why := unknown_reach(f)):
            raise InputError(f"{f}: {why}")
        elif not users:
            notes.append(f"{f}: no built object reads it")
        objs.extend(users)
    objs = list(dict.fromkeys(objs))
    if not objs:
        raise InputError(f"{patch.path.name} changes no C file built in this tree")
    return objs, notes


def _compile_all(tree: KernelTree, ov: Overlay, objs: list[str], outdir: Path, jobs: int,
                 flags: str, runner: Any = None) -> dict[str, Path]:
    """Recompile ``objs`` into ``outdir`` (mirroring their paths) with extra ``flags``, reading the tree
    through ``ov.view``; return the outputs. On any failure or interrupt the other compiles are ended.

    ``runner`` (a Clang tree's :class:`~klpforge.kbuild.clang.RootRunner`) runs each whole command in the
    Clang build root: a module object's recorded command of an LTO kernel (7.3 ``scripts/Makefile.build``)
    also runs ``ld.lld -r`` and ``./tools/objtool/objtool``, a binary built in (and linked against) the root."""
    outs = {o: outdir / o for o in objs}
    for p in outs.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    cwd = ov.view if tree.src == tree.build else tree.build  # in-tree commands use relative paths
    pids: list[int] = []

    def one(obj: str) -> str:
        cmd = rewrite_command(tree.compile_command(obj).redirected(outs[obj], flags), tree.src, tree.build,
                              ov.view)
        if runner is None:
            r = run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, track=pids)
        else:
            r = runner(cmd, cwd)
        if r.returncode != 0 or not outs[obj].is_file():
            err = "\n".join(ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln.lower())
            raise InputError(f"compiling {obj} failed: {(err or r.stderr or r.stdout).strip()[:600]}")
        dep = outs[obj].parent / f".{outs[obj].name}.d"
        if dep.is_file():
            leaked = reads_from_tree(dep, cwd, tree.src, ov.paths)
            if leaked:
                raise InputError(f"compiling {obj} read {leaked[0]} from the tree instead of klpforge's "
                                 "copy (an include path leaving the overlay); refusing a wrong comparison")
        return obj

    ex = ThreadPoolExecutor(max_workers=max(1, jobs))
    futs: list[Future[str]] = [ex.submit(one, o) for o in objs]
    try:
        for f in futs:
            f.result()
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        kill_children(pids)  # the compiles still running: their results are not wanted
        raise
    finally:
        ex.shutdown(wait=True)
    return outs


def _symbol_bindings(obj: Path) -> dict[str, str]:
    """Defined symbol name -> binding (``STB_LOCAL``/``STB_GLOBAL``/...)."""
    with obj.open("rb") as f:
        st = ELFFile(f).get_section_by_name(".symtab")
        if st is None:
            return {}
        return {s.name: s["st_info"]["bind"] for s in st.iter_symbols()  # type: ignore[attr-defined, unused-ignore]
                if s["st_shndx"] != "SHN_UNDEF" and s.name}


def _export_callbacks(linkable: Path, o: DiffOutcome, uid: int) -> Path:
    """Make the callback functions of ``o`` global so the generated core can point at them.

    The diff engine keeps a callback under its (usually static) source name; ``objcopy`` renames it to a
    unique ``klpforge_cb_<n>_<kind>`` and makes it global (a copy; the diff output stays as written).
    """
    if not o.callbacks:
        return linkable
    binds = _symbol_bindings(linkable)
    redefine: list[str] = []
    for kind, sym in list(o.callbacks.items()):
        if binds.get(sym) == "STB_GLOBAL":
            continue
        if sym not in binds:
            raise InputError(f"{o.obj}: callback {kind} -> {sym} is not defined in the diff output")
        new = f"klpforge_cb_{uid}_{kind}"
        redefine += ["--redefine-sym", f"{sym}={new}", "--globalize-symbol", new]
        o.callbacks[kind] = new
    if not redefine:
        return linkable
    out = linkable.with_name(linkable.stem + ".cb.o")
    r = run(["objcopy", *redefine, str(linkable), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise InputError(f"objcopy could not export the callbacks of {o.obj}: {r.stderr.strip()}")
    return out


def _check_resolvable(ko: Path, symvers: Path | None) -> None:
    """Every undefined symbol of the module must be exported (Module.symvers); anything else would make
    insmod fail with 'Unknown symbol' -- say so now, naming them."""
    if symvers is None:
        return
    exported = {ln.split("\t")[1] for ln in symvers.read_text().splitlines() if ln.count("\t") >= 2}
    with ko.open("rb") as f:
        st = ELFFile(f).get_section_by_name(".symtab")
        undef = {s.name for s in st.iter_symbols()  # type: ignore[attr-defined, unused-ignore]
                 if s["st_shndx"] == "SHN_UNDEF" and s.name} if st is not None else set()
    missing = sorted(undef - exported)
    if missing:
        raise InputError(f"{ko.name} would not load: unresolved symbols {', '.join(missing[:8])} "
                         "(neither exported nor turned into klp relocations)")


def _has_klp_sections(obj: Path) -> bool:
    with obj.open("rb") as f:
        return any(s.name.startswith(".klp.rela.") for s in ELFFile(f).iter_sections())


def klp_targets(outcomes: list[DiffOutcome], post: Any, what: str = "") -> tuple[dict[str, KlpTarget], list[Any]]:
    """One :class:`KlpTarget` per target of the diffed objects (vmlinux or a module), and the klp relocation
    sidecars stripped from them (``post``: :func:`~klpforge.kbuild.diffstep.postlink_api`). Raises
    :class:`NoChange` (message prefixed with ``what``) when no function is replaced, ``InputError`` for two
    callbacks of one kind on a target."""
    targets: dict[str, KlpTarget] = {}
    sidecars: list[Any] = []
    for o in outcomes:
        t = targets.setdefault(o.target, KlpTarget(o.target))
        t.funcs.extend(o.funcs)
        for kind in o.callbacks:
            if kind in t.callbacks:
                raise InputError(f"two {kind} callbacks for {o.target}")
        linkable = o.out
        if _has_klp_sections(o.out):
            if post is None:
                raise InputError(f"{o.obj}: the livepatch needs klp relocations but "
                                 "klpforge.diff.emit.postlink is not available yet")
            linkable = o.out.with_suffix(".link.o")
            sidecars.append(post.strip_klp(o.out, linkable))
        linkable = _export_callbacks(linkable, o, len(t.objects) + 100 * len(targets))
        t.objects.append(linkable)
        t.callbacks.update(o.callbacks)
    if not any(t.funcs for t in targets.values()):
        raise NoChange(f"{what}the diff found no function to replace")
    # Linux 6.1 applies .klp.rela.<obj>.* only for a klp_object named <obj> (klp_init_object_loaded): a
    # reference into another module's exports (nfsd code calling sunrpc) needs that object even with no
    # function of its own to replace.
    for obj in sorted({r["obj"] for sc in sidecars for r in sc["relocations"]} - set(targets)):
        targets[obj] = KlpTarget(obj)
    return targets, sidecars


@contextmanager
def timed_step(name: str, timings: dict[str, float], progress: ProgressFn | None, msg: str) -> Iterator[None]:
    """Report ``msg`` to ``progress`` and add the step's wall time (s) to ``timings[name]``."""
    if progress:
        progress(name, msg)
    t0 = time.monotonic()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.monotonic() - t0


def build_livepatch(opts: BuildOptions, progress: ProgressFn | None = None) -> BuildResult:
    """Run the whole pipeline; raise ``InputError``/``UnsafeChange``/``NoChange`` with one line on failure.

    The user's source and build trees are only read (the patch is applied to private copies, every output
    goes to a temporary directory, removed before this returns or raises unless ``keep_tmp``), so any
    number of builds may run on one tree at once.
    """
    timings: dict[str, float] = {}
    src = opts.src.resolve()
    check_old_journal(src)
    stem = opts.patch.name.removesuffix(".patch").removesuffix(".diff")
    output = opts.output or Path(f"livepatch-{stem}.ko")
    modname = sanitize_module_name(output.name.removesuffix(".ko"))
    flags = f"{SECTION_FLAGS} -I{data_include_dir()}"
    tmp: Path | None = None
    blog: BuildLog | None = None
    try:
        with signals_held():  # a signal now is raised inside this try, after both names are bound
            tmp = Path(tempfile.mkdtemp(prefix="klpforge-build-")).resolve()
            blog = BuildLog.start("build", stem)  # kept in the cache on failure, named on the error line
        log = blog.path
        progress = blog.wrap(progress)
        with ExitStack() as stack:
            return _build(opts, progress, timings, src, stem, output, modname, tmp, blog, log, flags, stack)
    except BaseException as e:
        if blog is not None:
            blog.failed(e)
        if opts.keep_tmp and isinstance(e, KlpError):
            e.kept = tmp
        raise
    finally:
        if tmp is not None and not opts.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _clang_setup(tree: KernelTree, stack: ExitStack) -> tuple[Toolchain, Any]:
    """For a Clang tree: refuse what is not supported, enter the Clang build root (tools on ``PATH``) and
    return the toolchain and a :class:`~klpforge.kbuild.clang.RootRunner`; ``(gcc toolchain, None)`` else."""
    tc = Toolchain.from_config(tree.config)
    if tc.cc != "clang":
        return tc, None
    check_supported(tc, tree.build / ".config")
    root = clang_root_for(cc_version_text(tree.build / ".config"))
    binds = root_binds(tree.src, tree.build, data_include_dir())  # kpatch-macros.h: -I of every compile
    stack.enter_context(tools_in_root(root, binds))
    return tc, RootRunner(root, tuple(binds))


def _build(opts: BuildOptions, progress: ProgressFn | None, timings: dict[str, float], src: Path, stem: str,
           output: Path, modname: str, tmp: Path, blog: BuildLog, log: Path, flags: str,
           stack: ExitStack) -> BuildResult:
    with timed_step("check", timings, progress, "checking tree and patch"):
        tree = KernelTree(src, opts.build)
        tree.check_livepatch()
        tc, runner = _clang_setup(tree, stack)
        if not opts.skip_compiler_check and runner is None:
            tree.check_compiler()  # Clang: the root's clang prints CONFIG_CC_VERSION_TEXT (checked above)
        patch = SourcePatch.parse(opts.patch)
        patch.check_tree(tree.src)
        patch.refuse_unpatchable()
        ov = Overlay(tree.src, tmp / "src", patch.files)
        ov.snapshot(patch)
        objs, _notes = _changed_objects(tree, patch)
        tree.check_sources(objs)
        parents: dict[str, Parent] = {o: tree.parent_of(o) for o in objs}
        env = struct_sizes(tree)
        if opts.extra_cflags:  # both compiles (extract: -fdump-ipa-clones)
            flags += f" {opts.extra_cflags}"
        ov.build_view()
    # distributed ThinLTO: bitcode objects go through the LTO steps; objects Kbuild compiled to native code
    # (CC_FLAGS_LTO filtered out for them, so not in vmlinux.thinlto-index) are compiled twice as with GCC
    bitcode = [o for o in objs if o in set(index_objects(tree.build))] if tc.lto == "thin-dist" else []
    plain = [o for o in objs if o not in bitcode]
    orig: dict[str, Path] = {}
    if plain:
        with timed_step("orig", timings, progress, f"compiling {len(plain)} original object(s)"):
            ov.show("orig")
            orig = _compile_all(tree, ov, plain, tmp / "orig", opts.jobs, flags, runner)
    with timed_step("patched", timings, progress, "compiling patched objects"):
        ov.show("new")
        pause = os.environ.get("KLPFORGE_PAUSE_AFTER_APPLY")  # test hook: interrupt midway
        if pause:
            time.sleep(float(pause))
        patched = _compile_all(tree, ov, objs, tmp / "patched", opts.jobs, flags, runner)
    lto_why: dict[str, str] = {}
    if bitcode:  # the tree's own bitcode is the original; redo the index link and the backends that changed
        with timed_step("lto", timings, progress, "ThinLTO: index link and the backends it changes"):
            plan = relink_index(tree.build, tmp / "lto-view", {o: patched[o] for o in bitcode}, runner)
            lto_orig, lto_new = backend(tree.build, plan, tmp / "native", SECTION_FLAGS, opts.jobs, runner)
            lto_why = plan.why
            for ob in plan.redo:  # the running kernel's .llvm.<hash> names (they move with any edit)
                ren = stable_llvm_names(lto_orig[ob], lto_new[ob])
                if ren:
                    lto_why[ob] += "; ThinLTO names kept: " + ", ".join(f"{n} -> {v}" for n, v in ren.items())
            orig.update(lto_orig)
            patched = {**{o: patched[o] for o in plain}, **lto_new}
            objs = plain + plan.redo
            parents.update({o: tree.parent_of(o) for o in objs if o not in parents})
    outcomes: list[DiffOutcome] = []
    unchanged: list[str] = []
    refused: list[str] = []
    with timed_step("diff", timings, progress, "diffing objects"):
        for i, obj in enumerate(objs):
            par = parents[obj]
            out = tmp / "diff" / f"{i}-{Path(obj).name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                outcomes.append(run_object_diff(obj, orig[obj], patched[obj], out, par.target,
                                                par.binary, tree.symvers, env))
            except NoChange:
                unchanged.append(obj)
            except UnsafeChange as e:  # every object's reasons at once, not only the first object's
                refused += e.reasons
        if tc.cfi:  # every function keeps its kCFI type hash (kbuild/kcfi.py), replaced or not
            for obj in objs:
                refused += check_kcfi(obj, orig[obj], patched[obj])
        if refused:
            raise UnsafeChange(refused)
        exports = patch_exports(orig, patched)  # before "no change": the diff ignores export tables
        if not outcomes:
            raise NoChange(f"{patch.path.name}: no function changed in {', '.join(objs)}")
        for o in outcomes:
            if o.obj in lto_why:
                o.report["lto"] = {"object": o.obj, "why_rebuilt": lto_why[o.obj]}
    with timed_step("module", timings, progress, f"building module {modname} with Kbuild"):
        post = postlink_api()
        targets, sidecars = klp_targets(outcomes, post, f"{patch.path.name}: ")
        prov = provenance.record([opts.patch], provenance.config_compiler(tree.build / ".config"))
        ko = build_module(tree.build, tmp / "kmod", modname, list(targets.values()), opts.replace,
                          opts.jobs, log, exports, provenance.modinfo(prov))
    with timed_step("postlink", timings, progress, "writing klp relocations"):
        if sidecars:  # all objects in one rewrite; the patch's own new globals bind inside the module
            from ..diff.emit.ibt import seal_lists  # a module target's .ko has its own seal list

            post.apply_klp(ko, sidecars, tree.vmlinux,  # type: ignore[union-attr]
                           patch_globals(orig, patched),
                           sealed=seal_lists({p.target: p.binary for p in parents.values()}))
        _check_resolvable(ko, tree.symvers)
        if sidecars:
            (tmp / "sidecars.json").write_text(json.dumps(sidecars, default=_jsonable, indent=1))
        atomic_write(output, provenance.rehash_build_id(ko.read_bytes()))  # reproducible build-id
    res = BuildResult(output, modname, outcomes, unchanged, timings, tmp if opts.keep_tmp else None,
                      exports, prov)
    if opts.report_json:
        atomic_write(opts.report_json, json.dumps(res.report(), indent=1) + "\n")
    if opts.keep_tmp:
        shutil.copyfile(log, tmp / "build.log")
    blog.succeeded()
    return res


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)
