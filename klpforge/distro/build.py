"""``klpforge build --distro debian:RELEASE fix.patch...``: a live patch for the kernel a distribution ships.

Steps (timed, :data:`STEPS`): *prepare* (packages + source tree, cached per release), *compile* (the changed
objects only, original by a Kbuild single-target build, patched from a private overlay), *match* (the
source-matches-binary check of :mod:`.match`), *diff* (:mod:`klpforge.diff` per object against the shipped
module's symbol table or the kallsyms capture), *link* (Kbuild against the distribution's headers package, so
vermagic and CRCs are the shipped kernel's; klp relocations written back after the link).

Several patch files are applied in order into one overlay: one cumulative live patch (atomic replace).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..diff.symtab import AmbiguousSymbol
from ..kbuild.diffstep import DiffOutcome, postlink_api, run_object_diff
from ..kbuild.module import KlpTarget, build_module, sanitize_module_name
from ..kbuild.newsyms import patch_globals
from ..kbuild.patchfile import SourcePatch
from ..kbuild.pipeline import _check_resolvable, klp_targets, timed_step
from ..kbuild.structsizes import struct_sizes
from ..util import proc, provenance
from ..util.buildlog import BuildLog
from ..util.errors import InputError, KlpError, NoChange, UnsafeChange
from ..util.fsutil import atomic_write, tree_lock
from ..util.proc import signals_held
from .base import DistroTree
from .compile import compile_original, compile_patched, parent_of, recorded_command
from .debian import make_command, package_records
from .match import SizeVerdict, check_sizes, object_function_sizes
from .modules import plain_module
from .reach import candidate_objects, header_changes, included_files, includer_candidates, objects_including
from .roots import tools_on_path
from .sign import check_sign_args, finish_module
from .symbols import capture_kallsyms, module_index, shipped_sizes

__all__ = ["DistroBuildOptions", "DistroBuildResult", "build_distro", "STEPS"]

STEPS = ("prepare", "compile", "diff", "match", "link")

Progress = Callable[[str, str], None]


@dataclass
class DistroBuildOptions:
    """Inputs: the patches (applied in order, -p1), the release (``debian:6.1.0-56-amd64``) or a prepared
    tree, and overrides for the vmlinux symbol table (``--symbols``/``--vmlinux``)."""

    patches: list[Path]
    distro: str | None = None
    tree: DistroTree | None = None
    output: Path | None = None
    jobs: int = 2
    replace: bool = True
    keep_tmp: bool = False
    report_json: Path | None = None
    vmlinux_symbols: Path | None = None
    symvers: Path | None = None
    sign_key: Path | None = None
    sign_cert: Path | None = None


@dataclass
class DistroBuildResult:
    """The module written and what went in."""

    output: Path
    module_name: str
    release: str
    outcomes: list[DiffOutcome]
    unchanged: list[str]
    sizes: dict[str, list[SizeVerdict]]
    objects_compiled: int
    timings: dict[str, float] = field(default_factory=dict)
    impact: dict[str, Any] = field(default_factory=dict)
    tmpdir: Path | None = None
    notes: list[str] = field(default_factory=list)
    signed: bool = False
    #: what went in (klpforge.util.provenance.record), also in the module's .modinfo
    provenance: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-able: per object its target, replaced functions with sympos and why, the size proof."""
        return {
            "output": str(self.output), "module": self.module_name, "release": self.release,
            "objects_compiled": self.objects_compiled,
            "objects": [
                {"object": o.obj, "target": o.target,
                 "functions": [{"old_name": f.old_name, "sympos": f.sympos, "new_symbol": f.new_symbol,
                                "reason": f.reason} for f in o.funcs],
                 "carried_functions": o.carried, "callbacks": o.callback_sources,
                 "source_matches_binary": [v.__dict__ for v in self.sizes.get(o.obj, [])],
                 "impact": self.impact.get(o.obj, {}), "diff_report": o.report}
                for o in self.outcomes],
            "unchanged_objects": self.unchanged,
            "provenance": self.provenance,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "signed": self.signed, "notes": self.notes,
        }


class _ProbeTree:
    """What :func:`klpforge.kbuild.structsizes.struct_sizes` needs: ``build`` and recorded commands."""

    def __init__(self, tree: DistroTree):
        self.build = tree.build
        self._tree = tree

    def compile_command(self, obj: str) -> Any:
        return recorded_command(self._tree, obj)


def _objects(patches: list[SourcePatch], allow_headers_only: bool = False) -> list[str]:
    objs: list[str] = []
    for p in patches:
        p.refuse_unpatchable()
        for f in p.files:
            if f in p.created:
                raise InputError(f"{f}: the patch creates a file; a live patch can only change existing objects")
            if f.endswith(".c"):
                objs.append(f[:-2] + ".o")
            elif f.endswith(".h"):
                continue  # compiled through the .c files the patches touch
    objs = list(dict.fromkeys(objs))
    if not objs and not allow_headers_only:
        raise InputError("the patches change no C file; a header-only change needs the .c files that use it "
                         "in the patch (distribution trees record no include dependencies without a full build)")
    return objs


def _with_header_reach(tree: DistroTree, patches: list[SourcePatch], objs: list[str], jobs: int,
                       progress: Progress | None) -> list[str]:
    """``objs`` plus every object a changed header function reaches (:mod:`.reach`): candidates named by
    the functions, compiled by Kbuild (``make -k``: those the config does not build drop out), kept when
    their preprocessor dependency list names the header; and every object whose source includes a
    changed ``.c`` (or other non-header) file, proven the same way (fs/compat_binfmt_elf.o for
    fs/binfmt_elf.c). Raises :class:`InputError` when the header change
    is outside function bodies and the patch names no ``.c`` file (its reach cannot be known)."""
    funcs, outside = header_changes(patches, tree.src)
    say = (lambda m: progress("compile", m)) if progress else (lambda _m: None)
    # .c (and other) files other .c files #include: their includers' objects carry a copy of the change
    incl = includer_candidates(tree, included_files(patches))
    inc_cands = list(dict.fromkeys(o for v in incl.values() for o in v if o not in objs))
    if not funcs and not inc_cands:
        return objs
    if funcs and outside and not objs:
        raise InputError(f"{outside[0]}: the patch changes lines outside function bodies (a macro, type or "
                         "declaration): which objects that reaches cannot be known without a full build; add the "
                         ".c files to rebuild to the patch")
    cands = [o for o in candidate_objects(tree, funcs, say) if o not in objs] if funcs else []
    # a .c compiled only inside its includer (6.1's kernel/sched/completion.c, in build_utility.c) has no
    # object of its own: its name is tried with the candidates and dropped below when Kbuild has no rule
    owns = [f[:-2] + ".o" for f, users in incl.items() if f.endswith(".c") and users]
    every = list(dict.fromkeys(cands + inc_cands + [o for o in owns if not (tree.build / o).is_file()]))
    if not every:
        return objs
    with tree_lock(tree.lock or tree.build / ".lock"):
        log = tree.build.parent / "reach.log"
        log.write_text("")
        cmd = make_command(tree, "-k", *every, jobs=jobs)
        with log.open("ab") as f:
            # through proc: make and its gcc jobs end with klpforge (issue 17 item 4)
            proc.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    reached = objects_including(tree, [o for o in cands if (tree.build / o).is_file()], list(funcs)) if funcs else []
    if reached:
        say(f"header change reaches {len(reached)} more object(s): {', '.join(reached[:8])}"
            + (" ..." if len(reached) > 8 else ""))
    included = [o for o in objects_including(tree, [o for o in inc_cands if (tree.build / o).is_file()], list(incl))
                if o not in reached]
    if included:
        say(f"{len(included)} more object(s) #include a changed file: {', '.join(included)}")
    for name, users in incl.items():
        if not name.endswith(".c") and not set(users) & set(included):
            raise InputError(f"{name}: not C source and no object of {tree.release} this configuration builds "
                             "records it as a dependency: which objects it reaches cannot be known")
    for name, users in incl.items():
        own = name[:-2] + ".o"
        if name.endswith(".c") and own in objs and not (tree.build / own).is_file() and set(users) & set(included):
            objs = [o for o in objs if o != own]
            say(f"{name} is compiled only as part of {', '.join(u for u in users if u in included)}")
    if not reached and not included and not objs:
        raise NoChange(f"no object of {tree.release} uses {', '.join(sorted({n for v in funcs.values() for n in v}))}")
    return objs + reached + included


def _impact(dump_dir: Path, obj: str, patches: list[SourcePatch], src: Path, replaced: list[str]) -> dict[str, Any]:
    """Why each replaced function is in, from GCC's ``-fdump-ipa-clones`` dump of the original object (as
    ``klpforge impact``): the functions the patches edit (tree-sitter on the pristine source) are the seeds;
    a replaced function the patch did not touch is explained by its chain (inlined into, cloned from)."""
    try:
        from ..ipa import predict
        from ..ipa.patchmap import functions_of_patch

        source = obj[:-2] + ".c"
        seeds: list[str] = []
        for p in patches:
            funcs, _notes = functions_of_patch(p.path, src)
            seeds += [f for f in funcs if f.startswith(source + ":")]
        dumps = sorted(dump_dir.glob("*ipa-clones"))
        if not seeds or not dumps:
            return {"edited": seeds, "note": "no clone dump or no edited function found"}
        res = predict([str(d) for d in dumps], list(dict.fromkeys(seeds)))
        explained: dict[str, list[str]] = {}
        for name in replaced:
            for e in res.reasons(name):
                if e.chain:
                    explained[name] = [st.text() for st in e.chain]
        return {"edited": [f.split(":", 1)[1] for f in seeds], "predicted": sorted(res.functions),
                "explained": explained, "unpredicted": sorted(set(replaced) - res.functions)}
    except Exception as e:  # noqa: BLE001 - an explanation must never fail the build
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _symbol_tables(tree: DistroTree, opts: DistroBuildOptions, parents: dict[str, Any], mods: dict[str, Path],
                   progress: Progress | None) -> dict[str, Path]:
    """Per object the shipped symbol table of its parent: the module's ``.ko`` or the vmlinux symbols
    (``--symbols``, else a ``/proc/kallsyms`` capture of the shipped image, taken once per release)."""
    out: dict[str, Path] = {}
    for o, par in parents.items():
        if par.is_module:
            if par.target not in mods:
                raise InputError(f"{o} belongs to module {par.target}, which is not among the shipped modules "
                                 f"({tree.modules_dir or 'none given: --modules DIR'})")
            out[o] = plain_module(mods[par.target])  # .ko.xz/.ko.zst read decompressed
            continue
        if opts.vmlinux_symbols is None:
            if tree.vmlinuz is None:
                raise InputError(f"{o} is linked into vmlinux: pass its symbols with --symbols (a vmlinux with "
                                 "symbols, `readelf -sW` text or a /proc/kallsyms capture)")
            say = (lambda m: progress("prepare", m)) if progress else (lambda _m: None)
            opts.vmlinux_symbols = capture_kallsyms(tree.vmlinuz or Path("vmlinuz"), tree.build / "usr/gen_init_cpio",
                                                    tree.build.parent / "kallsyms-v2.readelf", say)
        out[o] = opts.vmlinux_symbols
    return out


def _dbg_symtab(tree: DistroTree, progress: Progress | None) -> Path:
    """The ``-dbg`` vmlinux symbol table of a Debian release, fetched once (klpforge/distro/dbgsyms.py)."""
    from .dbgsyms import DBG_SYMBOLS, dbg_symbols

    made = tree.build.parent / DBG_SYMBOLS
    if made.is_file() and made.stat().st_size:
        return made
    say = (lambda m: progress("diff", m)) if progress else (lambda _m: None)
    version = package_records(tree.release, say=say)["image"].version
    return dbg_symbols(tree.release, tree.build.parent, version, say)


def _seal_list(tree: DistroTree, tables: dict[str, Path]) -> Callable[[str], dict[str, list[bool]]]:
    """Target object name -> the shipped kernel's functions of it whose ENDBR is sealed, read on demand (only
    for an object whose function's address the patch takes). vmlinux: the seal list in ``vmlinuz``, named by
    the vmlinux symbols (:func:`klpforge.diff.emit.ibt.sealed_in_image`); a module: its own ``.ibt_endbr_seal``
    (:func:`klpforge.diff.emit.ibt.sealed_in_module`); without a ``vmlinuz`` (the plain form), the list of a vmlinux
    given as ``--symbols``, none for a text symbol table. ``tables``: object name -> its shipped symbol table (the
    vmlinux symbols, the decompressed ``.ko``). Debian's 6.12 and later have ``CONFIG_X86_KERNEL_IBT=y``; a
    kernel without it has no seal list and nothing is refused."""
    from ..diff.emit.ibt import sealed_functions, sealed_in_image, sealed_in_module

    def load(obj: str) -> dict[str, list[bool]]:
        table = tables.get(obj)
        if table is None:
            return {}
        if obj != "vmlinux":
            return sealed_in_module(table)
        if tree.vmlinuz and Path(tree.vmlinuz).is_file():
            return sealed_in_image(Path(tree.vmlinuz), table)
        with open(table, "rb") as f:  # the plain form's --symbols may be the vmlinux itself (a -dbg one)
            return sealed_functions(table) if f.read(4) == b"\x7fELF" else {}

    return load


def _link(tree: DistroTree, workdir: Path, modname: str, targets: list[KlpTarget], opts: DistroBuildOptions,
          symvers: Path | None, log: Path, info: Sequence[tuple[str, str]] = ()) -> Path:
    """Kbuild link against ``tree.headers``; a ``--symvers`` the headers lack goes in as
    ``KBUILD_EXTRA_SYMBOLS`` (modpost takes CRCs from it)."""
    assert tree.headers is not None
    extra = symvers is not None and not (tree.headers / "Module.symvers").is_file()
    old = os.environ.get("KBUILD_EXTRA_SYMBOLS")
    if extra:
        os.environ["KBUILD_EXTRA_SYMBOLS"] = str(Path(str(symvers)).resolve())
    try:
        with tools_on_path(tree):  # Kbuild of the headers package in the release's build root
            return build_module(tree.headers, workdir, modname, targets, opts.replace, opts.jobs, log, info=info)
    finally:
        if extra:
            if old is None:
                os.environ.pop("KBUILD_EXTRA_SYMBOLS", None)
            else:
                os.environ["KBUILD_EXTRA_SYMBOLS"] = old


def build_distro(opts: DistroBuildOptions, progress: Progress | None = None) -> DistroBuildResult:
    """Build the cumulative live patch; raises ``InputError``/``UnsafeChange``/``NoChange`` with one line (the
    build log, kept in the cache on failure, is attached to the error: :mod:`klpforge.util.buildlog`)."""
    if not opts.patches:
        raise InputError("no patch given")
    check_sign_args(opts.sign_key, opts.sign_cert)
    patches = [SourcePatch.parse(p) for p in opts.patches]
    stem = patches[0].path.name.removesuffix(".patch").removesuffix(".diff")
    blog: BuildLog | None = None
    try:
        with signals_held():  # no moment where a signal would leave the log file in $TMPDIR
            blog = BuildLog.start("build", stem)  # kept in the cache on failure, named on the error line
        return _build_distro(opts, patches, blog, blog.wrap(progress))
    except BaseException as e:
        if blog is not None:
            blog.failed(e)
        raise


def _build_distro(opts: DistroBuildOptions, patches: list[SourcePatch], blog: BuildLog,
                  progress: Progress) -> DistroBuildResult:
    timings: dict[str, float] = {}
    objs = _objects(patches, allow_headers_only=True)
    with timed_step("prepare", timings, progress, "fetching and preparing the distribution tree"):
        tree = opts.tree
        if tree is None:
            from . import backend_for

            mod, release = backend_for(opts.distro or "")
            tree = mod.prepare_tree(release, jobs=opts.jobs,
                                    progress=lambda m: progress("prepare", m))
        assert tree is not None
        if tree.headers is None:
            raise InputError("no headers or build directory to link the live patch module in")
        for p in patches:
            p.check_tree(tree.src)
        mods = module_index(tree.modules_dir) if tree.modules_dir else {}
    with timed_step("compile", timings, progress, "finding the objects the header changes reach"):
        objs = _with_header_reach(tree, patches, objs, opts.jobs, progress)
    stem = patches[0].path.name.removesuffix(".patch").removesuffix(".diff")
    output = opts.output or Path(f"livepatch-{stem}.ko")
    # livepatch-fix.ko.xz -> livepatch_fix: the compression suffix is not part of the module's name
    modname = sanitize_module_name(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", output.name))
    log = blog.path
    tmp: Path | None = None
    try:
        with signals_held():  # a signal now is raised inside this try, with tmp bound
            tmp = Path(tempfile.mkdtemp(prefix="klpforge-distro-"))
        with timed_step("compile", timings, progress, f"compiling {len(objs)} object(s), original and patched"):
            orig = compile_original(tree, objs, tmp / "orig", opts.jobs, log)
            overlay = tmp / "overlay"
            from .compile import make_overlay_all

            make_overlay_all(tree, patches, objs, overlay)
            patched = compile_patched(tree, objs, overlay, tmp / "patched", opts.jobs)
            with tools_on_path(tree):  # the probe runs the release's compiler by name
                env = struct_sizes(_ProbeTree(tree), objs[0])  # type: ignore[arg-type]
        parents = {o: parent_of(recorded_command(tree, o)) for o in objs}
        symtabs: dict[str, Path] = {}
        auto_symbols = opts.vmlinux_symbols is None  # a kallsyms capture: the -dbg one may be fetched
        with timed_step("prepare", timings, progress, "shipped symbol tables"):
            symtabs = _symbol_tables(tree, opts, parents, mods, progress)
        outcomes: list[DiffOutcome] = []
        unchanged: list[str] = []
        sizes: dict[str, list[SizeVerdict]] = {}
        impact: dict[str, Any] = {}
        symvers = opts.symvers or tree.symvers
        refused: list[str] = []
        with timed_step("diff", timings, progress, "diffing objects against the shipped binaries"):
            for i, o in enumerate(objs):
                out = tmp / "diff" / f"{i}-{Path(o).name}"
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    try:
                        oc = run_object_diff(o, orig[o], patched[o], out, parents[o].target, symtabs[o], symvers, env)
                    except AmbiguousSymbol:
                        if parents[o].is_module or not auto_symbols or not (opts.distro or "").startswith("debian:"):
                            raise
                        symtabs[o] = _dbg_symtab(tree, progress)  # FILE symbols tell the copies apart
                        oc = run_object_diff(o, orig[o], patched[o], out, parents[o].target, symtabs[o], symvers, env)
                except NoChange:
                    unchanged.append(o)
                    continue
                except UnsafeChange as e:  # every object's reasons at once
                    refused += e.reasons
                    continue
                outcomes.append(oc)
            if refused:
                raise UnsafeChange(refused)
            if not outcomes:
                raise NoChange(f"no function changed in {', '.join(objs)}")
        with timed_step("match", timings, progress, "checking that the source matches the shipped binary"):
            for oc in outcomes:
                ours = object_function_sizes(orig[oc.obj])
                shipped = shipped_sizes(symtabs[oc.obj], parents[oc.obj].is_module)
                names = [f.old_name for f in oc.funcs]
                sizes[oc.obj] = check_sizes(ours, shipped, [(f.old_name, f.sympos) for f in oc.funcs],
                                            symtabs[oc.obj].name)
                impact[oc.obj] = _impact(orig[oc.obj].parent, oc.obj, patches, tree.src, names)
        with timed_step("link", timings, progress, f"linking {modname} against {tree.headers.name}"):
            post = postlink_api()
            if post is None:
                raise InputError("klpforge.diff.emit.postlink is missing from this checkout")
            targets, sidecars = klp_targets(outcomes, post)
            # what went in: packages (name, version, SHA-256), patches, compiler; in the report and .modinfo
            prov = provenance.record(opts.patches, provenance.config_compiler(tree.config),
                                     provenance.debian_packages(tree.build.parent))
            ko = _link(tree, tmp / "kmod", modname, list(targets.values()), opts, symvers, log,
                       provenance.modinfo(prov))
            if sidecars:  # all objects in one rewrite; globals the patch adds bind inside the module
                post.apply_klp(ko, sidecars, None, patch_globals(orig, patched),
                               sealed=_seal_list(tree, {parents[o].target: symtabs[o] for o in symtabs}))
            _check_resolvable(ko, symvers)
            if sidecars:
                (tmp / "sidecars.json").write_text(json.dumps(sidecars, default=str, indent=1))
            ko.write_bytes(provenance.rehash_build_id(ko.read_bytes()))  # reproducible build-id, then sign
            signed, notes = finish_module(tree, ko, output, opts.sign_key, opts.sign_cert, log)
        res = DistroBuildResult(output, modname, tree.release, outcomes, unchanged, sizes, 2 * len(objs), timings,
                                impact, tmp if opts.keep_tmp else None, notes=notes, signed=signed,
                                provenance=prov)
        if opts.report_json:
            atomic_write(opts.report_json, json.dumps(res.report(), indent=1, default=str) + "\n")
        if opts.keep_tmp:
            shutil.copyfile(log, tmp / "build.log")
        blog.succeeded()
        return res
    except KlpError as e:
        if opts.keep_tmp:
            e.kept = tmp
        raise
    finally:
        if tmp is not None and not opts.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
